-- Credentials, sealed with the master key (XChaCha20-Poly1305, bound to tenant + alias).
CREATE TABLE keychain (
    tenant     TEXT    NOT NULL,
    alias      TEXT    NOT NULL,
    sealed     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, alias)
);

//! NATS with authentication, against real `nats-server` processes of the test's own: a
//! server that requires credentials refuses a bare connection; user and password (from the
//! URL), a token, and an nkey seed (from a file) get in, and the JetStream queue works
//! through them. Skipped loudly without `nats-server`; a failure under CI=true.

use mayfly_queue::{CommandQueue, NatsConnect, NatsQueue, QueueConfig};
use std::time::Duration;

#[tokio::test]
async fn credentials_from_the_url_and_an_nkey_file_authenticate() {
    let user = nkeys::KeyPair::new_user();
    let Some(server) = mayfly_testkit::nats_server(&format!(
        "authorization {{ users = [ {{user: alice, password: \"s3cret\"}}, {{nkey: {}}} ] }}",
        user.public_key()
    )) else {
        return;
    };
    let at = |userinfo: &str| format!("nats://{userinfo}127.0.0.1:{}", server.port);
    // Nothing, or the wrong password: refused.
    for bad in [at(""), at("alice:wrong@")] {
        let e = match NatsConnect::url(&bad).connect().await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{bad}: connected without valid credentials"),
        };
        assert!(e.to_lowercase().contains("auth"), "{bad}: {e}");
        assert!(!e.contains("wrong"), "the password shows in an error: {e}");
    }
    // User and password in the URL: the JetStream queue works through them.
    let good = NatsConnect::url(&at("alice:s3cret@"));
    let q = NatsQueue::connect_to(&good, "AUTHED", QueueConfig::default())
        .await
        .expect("queue with credentials");
    q.publish("m1", b"hello").await.expect("publish");
    let d = q
        .pull(Duration::from_secs(5))
        .await
        .expect("pull")
        .expect("a message");
    assert_eq!(d.payload, b"hello");
    d.ack().await.expect("ack");
    // An nkey seed in a file.
    let dir = tempfile::tempdir().expect("tmp");
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().expect("seed")).expect("write");
    let nk = NatsConnect {
        url: at(""),
        nkey: Some(seed),
        ..Default::default()
    };
    let c = nk.connect().await.expect("nkey connects");
    c.flush().await.expect("flush");
}

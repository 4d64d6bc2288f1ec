//! Fail closed: a runtime that must sandbox tenant code and cannot start a sandbox refuses
//! that code (its own process: it changes PATH).

use mayfly_tools::{Scope, Tools, ToolsConfig};
use serde_json::{Map, json};

#[tokio::test]
async fn a_sandbox_that_cannot_start_fails_tenant_code_closed() {
    // A PATH without bwrap: the tools still start, and shell/python steps fail with the
    // reason and the fix, never running uncontained.
    let t = {
        let saved = std::env::var_os("PATH");
        // SAFETY: the only test of this binary; nothing else reads PATH meanwhile.
        unsafe { std::env::set_var("PATH", "/nonexistent") };
        let t = Tools::new(ToolsConfig {
            sandbox: true,
            ..Default::default()
        });
        unsafe {
            match saved {
                Some(p) => std::env::set_var("PATH", p),
                None => std::env::remove_var("PATH"),
            }
        }
        t.expect("tools start without a sandbox")
    };
    assert!(!t.sandboxed());
    for kind in ["shell", "python"] {
        let cfg = json!({"command": "true", "code": "result = 1"});
        let cfg = cfg.as_object().cloned().unwrap_or_default();
        let o = t
            .run_in(&Scope::default(), kind, &cfg, &Map::new(), None)
            .await;
        let e = o.error.expect("refused");
        assert_eq!(e.code, "sandbox_unavailable", "{kind}");
        assert!(
            e.message.contains("apt-get install bubblewrap"),
            "{}",
            e.message
        );
    }
}

//! The sandbox shared by a test binary's tests: opened once (the runner loads from the cache),
//! or None, with a message, when scripts/setup has not built the runtime.

use std::sync::OnceLock;

use prefloop_sandbox::Sandbox;

pub fn sandbox() -> Option<&'static Sandbox> {
    static SANDBOX: OnceLock<Option<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| match Sandbox::open_default() {
            Ok(sandbox) => Some(sandbox),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        })
        .as_ref()
}

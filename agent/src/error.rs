//! Errors as the agent logs and reports them.

/// `err` and its causes on one line, `outer: cause: root cause`, each cause said once: one whose
/// text the message before it already contains is left out (many errors repeat their cause).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut last = text.clone();
    let mut source = err.source();
    while let Some(e) = source {
        let message = e.to_string();
        if !last.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        last = message;
        source = e.source();
    }
    text
}

//! Errors for people: an error's message says what failed and its causes are its `source()`
//! chain; where one line is shown (logs, `status`), the chain is joined here, once.

/// An error and its causes, on one line: `what failed: because: because`.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    text
}

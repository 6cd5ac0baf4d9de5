//! Looking inside a running datapath without the agent: the pinned maps read and decoded
//! (`status`, `flows`), a probe packet run through the loaded program (`which`), and Maglev
//! table statistics for a backend set (`maglev`).

mod maglev;
mod pinned;

pub use maglev::maglev;
pub use pinned::{Output, flows, status, which};

//! The CLI's side of the control socket.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::protocol::{ControlError, MAX_MESSAGE, Request, Response};

/// Sends one request to the agent listening on `socket` and returns its response.
pub fn request(socket: &Path, request: &Request) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    // A drain may wait for a reload in progress (with its BGP drain time).
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream.take(MAX_MESSAGE as u64 + 1));
    let mut answer = Vec::new();
    reader.read_until(b'\n', &mut answer)?;
    if answer.len() > MAX_MESSAGE {
        return Err(ControlError::TooLong);
    }
    Ok(serde_json::from_slice(&answer)?)
}

//! TCP proxies a test can break. [`TcpProxy`] cuts every connection: each forwarded connection is
//! closed and new ones are refused until it is restored, which is what an unreachable dependency
//! looks like to a client. [`CommitCutProxy`] speaks just enough of the PostgreSQL protocol to cut
//! a connection between a COMMIT and its reply, which is what an unknown commit outcome looks like.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Forwards `127.0.0.1:port` to an upstream address.
pub struct TcpProxy {
    port: u16,
    upstream: String,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl TcpProxy {
    /// Starts forwarding a fresh local port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = TcpProxy {
            port,
            upstream: upstream.to_owned(),
            accept_task: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let task = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every forwarding task.
            let mut connections = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        *self.accept_task.lock().expect("proxy lock") = Some(task);
    }

    /// Closes every forwarded connection and refuses new ones.
    pub async fn cut(&self) {
        let task = self.accept_task.lock().expect("proxy lock").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        // Give the aborted forwarding tasks a moment to close their sockets.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Accepts and forwards connections again, on the same port.
    pub async fn restore(&self) {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

/// Forwards PostgreSQL traffic to an upstream server and, when armed, makes the outcome of
/// COMMITs unknown to the client: the COMMIT of a transaction that wrote rows (a `COPY` went
/// through on that connection since the last COMMIT or ROLLBACK) is forwarded to the server,
/// its reply is read and withheld, and both sockets are closed. Start-up, migrations and
/// statements outside such transactions pass untouched.
///
/// sqlx 0.8 sends `COMMIT` and `COPY ... FROM STDIN` as simple-query (`Q`) messages
/// (`PgTransactionManager::commit` executes a plain `&str`, which goes out as `Query`); the proxy
/// records which message kinds carried a COMMIT, so a test can show it. The client must not
/// negotiate TLS (`sslmode=disable`): an encrypted connection is forwarded blindly and never cut.
pub struct CommitCutProxy {
    port: u16,
    state: Arc<CommitCutState>,
    accept_task: JoinHandle<()>,
}

/// Shared by the connections of one [`CommitCutProxy`].
#[derive(Default)]
struct CommitCutState {
    plan: Mutex<CutPlan>,
    /// COMMITs forwarded whose reply the server sent and the proxy withheld before closing.
    num_cut: AtomicUsize,
    /// Row-writing COMMITs seen, cut or not.
    num_commits: AtomicUsize,
    /// The frontend message types (`Q`, `P`, ...) that carried a COMMIT statement.
    commit_kinds: Mutex<BTreeSet<char>>,
    /// Per cut COMMIT, the tables its transaction copied into, in order.
    cut_copy_targets: Mutex<Vec<Vec<String>>>,
}

/// Which row-writing COMMITs to cut.
#[derive(Default)]
struct CutPlan {
    cuts_left: usize,
    /// Row-writing COMMITs to let through after each cut.
    spacing: usize,
    passes_left: usize,
}

impl CommitCutState {
    /// Decides the fate of one row-writing COMMIT: true when it is to be cut.
    fn take_cut(&self) -> bool {
        self.num_commits.fetch_add(1, Ordering::SeqCst);
        let mut plan = self.plan.lock().expect("plan lock");
        if plan.cuts_left == 0 {
            return false;
        }
        if plan.passes_left > 0 {
            plan.passes_left -= 1;
            return false;
        }
        plan.cuts_left -= 1;
        plan.passes_left = plan.spacing;
        true
    }
}

/// How the client-to-server direction ended.
#[derive(Debug, PartialEq, Eq)]
enum ClientSide {
    /// Either side closed or failed.
    Closed,
    /// A COMMIT to cut reached the server; its reply must not reach the client.
    CommitForwarded,
}

/// How the server-to-client direction ended.
#[derive(Debug, PartialEq, Eq)]
enum ServerSide {
    Closed,
    /// Bytes arrived after a cut COMMIT was forwarded (its reply) and were dropped.
    ReplyWithheld,
}

impl CommitCutProxy {
    /// Starts forwarding a fresh local port to `upstream` (`host:port`), not armed.
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(CommitCutState::default());
        let upstream = upstream.to_owned();
        let accept_state = Arc::clone(&state);
        let accept_task = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every forwarding task.
            let mut connections = JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(forward_cutting_commits(
                    inbound,
                    upstream.clone(),
                    Arc::clone(&accept_state),
                ));
            }
        });
        CommitCutProxy {
            port,
            state,
            accept_task,
        }
    }

    /// The local port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the next row-writing COMMIT, then one in every `spacing + 1`, `num_cuts` times in
    /// all (across connections); then forwards normally.
    pub fn arm(&self, num_cuts: usize, spacing: usize) {
        *self.state.plan.lock().expect("plan lock") = CutPlan {
            cuts_left: num_cuts,
            spacing,
            passes_left: 0,
        };
    }

    /// COMMITs that reached the server and whose reply was withheld, the connection closed.
    pub fn num_cut(&self) -> usize {
        self.state.num_cut.load(Ordering::SeqCst)
    }

    /// Row-writing COMMITs seen, cut or not.
    pub fn num_commits(&self) -> usize {
        self.state.num_commits.load(Ordering::SeqCst)
    }

    /// The frontend message types that carried a COMMIT statement.
    pub fn commit_kinds(&self) -> BTreeSet<char> {
        self.state.commit_kinds.lock().expect("kinds lock").clone()
    }

    /// Per cut COMMIT, the tables (as written in the `COPY` statements) its transaction copied
    /// into.
    pub fn cut_copy_targets(&self) -> Vec<Vec<String>> {
        self.state
            .cut_copy_targets
            .lock()
            .expect("targets lock")
            .clone()
    }
}

impl Drop for CommitCutProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Forwards one connection; returns (closing both sockets) when either side closes, or once a
/// cut COMMIT's reply has been withheld.
async fn forward_cutting_commits(inbound: TcpStream, upstream: String, state: Arc<CommitCutState>) {
    let Ok(outbound) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_read, client_write) = inbound.into_split();
    let (server_read, server_write) = outbound.into_split();
    // Set before a cut COMMIT is written to the server, so whatever the server sends after it
    // (its reply) is never forwarded.
    let withholding = AtomicBool::new(false);
    let to_server = client_to_server(client_read, server_write, &state, &withholding);
    let to_client = server_to_client(server_read, client_write, &withholding);
    tokio::pin!(to_server, to_client);
    tokio::select! {
        ended = &mut to_server => {
            if ended == ClientSide::CommitForwarded {
                // Wait for the reply, so the server has certainly committed before the client
                // loses its connection: the outcome is "committed, but the client cannot know".
                match tokio::time::timeout(Duration::from_secs(10), &mut to_client).await {
                    Ok(ServerSide::ReplyWithheld) => {
                        state.num_cut.fetch_add(1, Ordering::SeqCst);
                    }
                    other => eprintln!("commit cut proxy: no reply to the cut COMMIT ({other:?})"),
                }
            }
        }
        _ = &mut to_client => {}
    }
}

async fn server_to_client(
    mut server_read: OwnedReadHalf,
    mut client_write: OwnedWriteHalf,
    withholding: &AtomicBool,
) -> ServerSide {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => return ServerSide::Closed,
            Ok(read) => read,
        };
        if withholding.load(Ordering::SeqCst) {
            return ServerSide::ReplyWithheld;
        }
        if client_write.write_all(&buffer[..read]).await.is_err() {
            return ServerSide::Closed;
        }
    }
}

async fn client_to_server(
    mut client_read: OwnedReadHalf,
    mut server_write: OwnedWriteHalf,
    state: &CommitCutState,
    withholding: &AtomicBool,
) -> ClientSide {
    let mut frames = FrontendFrames::default();
    let mut chunk = vec![0u8; 64 * 1024];
    // The tables copied into since the last COMMIT or ROLLBACK: when any, the open transaction
    // writes rows.
    let mut copy_targets: Vec<String> = Vec::new();
    loop {
        let read = match client_read.read(&mut chunk).await {
            Ok(0) | Err(_) => return ClientSide::Closed,
            Ok(read) => read,
        };
        frames.pending.extend_from_slice(&chunk[..read]);
        // Complete messages are forwarded; a message split across reads waits in `pending`.
        let mut forwardable = 0;
        while let Some((message, end)) = frames.next_message(forwardable) {
            match message {
                Frontend::Query(statement) => {
                    let statement = statement.trim().trim_end_matches(';').trim();
                    if is_keyword(statement, "COPY") {
                        let target = statement.split_whitespace().nth(1).unwrap_or_default();
                        copy_targets.push(target.to_owned());
                    } else if is_keyword(statement, "ROLLBACK") {
                        copy_targets.clear();
                    } else if statement.eq_ignore_ascii_case("COMMIT") {
                        state.commit_kinds.lock().expect("kinds lock").insert('Q');
                        let targets = std::mem::take(&mut copy_targets);
                        if !targets.is_empty() && state.take_cut() {
                            state
                                .cut_copy_targets
                                .lock()
                                .expect("targets lock")
                                .push(targets);
                            let commit_start = forwardable;
                            if server_write
                                .write_all(&frames.pending[..commit_start])
                                .await
                                .is_err()
                            {
                                return ClientSide::Closed;
                            }
                            withholding.store(true, Ordering::SeqCst);
                            if server_write
                                .write_all(&frames.pending[commit_start..end])
                                .await
                                .is_err()
                            {
                                return ClientSide::Closed;
                            }
                            return ClientSide::CommitForwarded;
                        }
                    }
                }
                Frontend::Parse(statement) => {
                    // Not cut: an extended-protocol COMMIT only runs at its Execute. Recorded so
                    // a test sees it if sqlx ever sends COMMIT this way.
                    if statement.trim().eq_ignore_ascii_case("COMMIT") {
                        state.commit_kinds.lock().expect("kinds lock").insert('P');
                    }
                }
                Frontend::Other => {}
            }
            forwardable = end;
        }
        if server_write
            .write_all(&frames.pending[..forwardable])
            .await
            .is_err()
        {
            return ClientSide::Closed;
        }
        frames.pending.drain(..forwardable);
    }
}

fn is_keyword(statement: &str, keyword: &str) -> bool {
    statement
        .get(..keyword.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(keyword))
        && statement[keyword.len()..]
            .chars()
            .next()
            .is_none_or(|next| next.is_ascii_whitespace())
}

/// The PostgreSQL frontend (client-to-server) message stream, split into messages: untyped
/// start-up messages (length, code) first, then typed ones (tag, length, body).
#[derive(Default)]
struct FrontendFrames {
    pending: Vec<u8>,
    /// After the StartupMessage: every message is typed.
    started: bool,
    /// Not parseable (TLS or GSS negotiation, a cancel request, a malformed length): bytes are
    /// forwarded as they come.
    opaque: bool,
}

/// What the proxy needs to know about one frontend message.
enum Frontend<'a> {
    /// A simple query (`Q`) and its text.
    Query(&'a str),
    /// An extended-protocol Parse (`P`) and its statement text.
    Parse(&'a str),
    Other,
}

impl FrontendFrames {
    /// The complete message starting at `start` of `pending`, and where it ends; `None` when it
    /// is not complete yet. Opaque streams are one message per read.
    fn next_message(&mut self, start: usize) -> Option<(Frontend<'_>, usize)> {
        let rest = &self.pending[start..];
        if self.opaque {
            return (!rest.is_empty()).then_some((Frontend::Other, self.pending.len()));
        }
        if !self.started {
            let header = rest.get(..8)?;
            let length = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            let code = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
            if length < 8 {
                self.opaque = true;
                return self.next_message(start);
            }
            if rest.len() < length {
                return None;
            }
            // 3.0 StartupMessage; SSLRequest (80877103), GSSENCRequest and CancelRequest are
            // not followed by plain typed messages this proxy could read.
            if code == 196_608 {
                self.started = true;
            } else {
                self.opaque = true;
            }
            return Some((Frontend::Other, start + length));
        }
        let header = rest.get(..5)?;
        let tag = header[0];
        let length = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
        if length < 4 {
            self.opaque = true;
            return self.next_message(start);
        }
        let end = start + 1 + length;
        if self.pending.len() < end {
            return None;
        }
        let body = &self.pending[start + 5..end];
        let message = match tag {
            b'Q' => cstring(body).map_or(Frontend::Other, |(query, _)| Frontend::Query(query)),
            b'P' => cstring(body)
                .and_then(|(_, name_len)| cstring(&body[name_len..]))
                .map_or(Frontend::Other, |(query, _)| Frontend::Parse(query)),
            _ => Frontend::Other,
        };
        Some((message, end))
    }
}

/// The NUL-terminated string at the start of `bytes`, and the bytes it takes with its NUL.
fn cstring(bytes: &[u8]) -> Option<(&str, usize)> {
    let nul = bytes.iter().position(|&byte| byte == 0)?;
    Some((std::str::from_utf8(&bytes[..nul]).ok()?, nul + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![tag];
        message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        message.extend_from_slice(body);
        message
    }

    /// What the proxy makes of `stream` when it arrives in reads of `chunk` bytes.
    fn parse_in_chunks(stream: &[u8], chunk: usize) -> Vec<String> {
        let mut frames = FrontendFrames::default();
        let mut seen = Vec::new();
        for piece in stream.chunks(chunk) {
            frames.pending.extend_from_slice(piece);
            let mut consumed = 0;
            while let Some((message, end)) = frames.next_message(consumed) {
                seen.push(match message {
                    Frontend::Query(query) => format!("Q {query}"),
                    Frontend::Parse(query) => format!("P {query}"),
                    Frontend::Other => "other".to_owned(),
                });
                consumed = end;
            }
            frames.pending.drain(..consumed);
        }
        assert!(frames.pending.is_empty(), "every message complete");
        seen
    }

    #[test]
    fn frontend_messages_are_found_whatever_the_reads_split() {
        let mut stream = Vec::new();
        let startup = b"\0\x03\0\0user\0postgres\0\0";
        stream.extend_from_slice(&(startup.len() as u32 + 4).to_be_bytes());
        stream.extend_from_slice(startup);
        stream.extend(typed(b'Q', b"BEGIN\0"));
        stream.extend(typed(b'Q', b"COPY \"s\".events (event_id) FROM STDIN\0"));
        stream.extend(typed(b'd', b"COMMIT\0 in the data\n"));
        stream.extend(typed(b'c', b""));
        stream.extend(typed(b'P', b"\0COMMIT\0\0\0"));
        stream.extend(typed(b'Q', b"COMMIT\0"));
        let whole = parse_in_chunks(&stream, stream.len());
        assert_eq!(
            whole,
            [
                "other",
                "Q BEGIN",
                "Q COPY \"s\".events (event_id) FROM STDIN",
                "other",
                "other",
                "P COMMIT",
                "Q COMMIT"
            ]
        );
        for chunk in 1..=16 {
            assert_eq!(
                parse_in_chunks(&stream, chunk),
                whole,
                "reads of {chunk} bytes"
            );
        }
    }

    #[test]
    fn a_tls_request_makes_the_stream_opaque() {
        let mut stream = 8u32.to_be_bytes().to_vec();
        stream.extend_from_slice(&80_877_103u32.to_be_bytes());
        stream.extend(typed(b'Q', b"COMMIT\0"));
        assert!(parse_in_chunks(&stream, 3)
            .iter()
            .all(|message| message == "other"));
    }
}

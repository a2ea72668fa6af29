//! The stateful counter server whose in-memory value proves a migration kept process state.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::thread;

static COUNTER: AtomicI64 = AtomicI64::new(0);

pub fn serve(port: u16) -> io::Result<()> {
    crate::stop::install_exit_on_term();
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening")?;
        out.flush()?;
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = handle(stream) {
                        eprintln!("connection ended: {e}");
                    }
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
    Ok(())
}

/// Answers one protocol line; `None` means the client asked to close.
pub fn answer(line: &str) -> Option<String> {
    match line.trim_end_matches(['\r', '\n']) {
        "INCR" => Some(format!("{}\n", COUNTER.fetch_add(1, Ordering::SeqCst) + 1)),
        "GET" => Some(format!("{}\n", COUNTER.load(Ordering::SeqCst))),
        "PING" => Some("PONG\n".to_string()),
        "QUIT" => None,
        other => Some(format!("ERR unknown command {other:?}\n")),
    }
}

fn handle(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match answer(&line) {
            Some(reply) => writer.write_all(reply.as_bytes())?,
            None => return Ok(()),
        }
    }
}

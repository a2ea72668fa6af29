//! `ferry-workload`: a stateful counter server and continuity-checking clients used to prove
//! that a migrated container kept both its memory and its open connections.
//!
//! Deliberately std-only (plus libc for signals): it is copied into minimal container images.

mod args;
mod client;
mod latency;
mod redis;
mod resp;
mod serve;
mod stop;
mod summary;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use args::Flags;
use client::ClientOpts;

const USAGE: &str = "usage:
  ferry-workload serve --port P
  ferry-workload client --addr IP:PORT --interval-ms MS [--duration-s S] [--stop-file PATH] [--out FILE] [--latency-log FILE] [--read-timeout-s S]
  ferry-workload redis-client --addr IP:PORT --interval-ms MS [--duration-s S] [--stop-file PATH] [--out FILE] [--latency-log FILE] [--read-timeout-s S]
  ferry-workload redis-load --addr IP:PORT --keys N --value-size B [--seed S]
  ferry-workload redis-digest --addr IP:PORT [--match PATTERN]
  ferry-workload expected-digest --keys N --value-size B [--seed S]

client/redis-client use one connection for the whole run and write a JSON summary (atomically,
also on failure): replies, first, last, continuous (each value = previous + 1), max_gap_ms,
gaps_over_100ms as [ms since start when the gap began, gap ms], errors, ok, elapsed_ms,
stopped_by (duration|stop-file|signal|error), and for redis-client sets.
--latency-log FILE writes a header `# t_ms latency_ms start_unix_ms=<wall clock at start>`, then
one `t_ms latency_ms` line per exchange (reply time since start, time since the request was sent).
--read-timeout-s S (default 30): how long one reply may take before the run counts the
connection as lost.
They exit 0 if the run was ok, 1 if not, 2 if the summary could not be written.
expected-digest prints what `redis-digest --match 'key:*'` reports right after redis-load.";

const CLIENT_FLAGS: &[&str] = &[
    "addr",
    "interval-ms",
    "duration-s",
    "stop-file",
    "out",
    "latency-log",
    "read-timeout-s",
];
const DEFAULT_SEED: u64 = 1;

fn client_opts(f: &Flags) -> Result<ClientOpts, String> {
    let addr: SocketAddr = f.req_num("addr")?;
    let interval_ms: u64 = f.req_num("interval-ms")?;
    let duration = f.num::<f64>("duration-s")?.map(Duration::from_secs_f64);
    Ok(ClientOpts {
        addr,
        interval: Duration::from_millis(interval_ms),
        stop: stop::Stop::new(duration, f.opt("stop-file").map(PathBuf::from)),
        out: f.opt("out").map(PathBuf::from),
        latency_log: f.opt("latency-log").map(PathBuf::from),
        read_timeout: match f.num::<f64>("read-timeout-s")? {
            None => client::READ_TIMEOUT,
            Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
            Some(s) => return Err(format!("--read-timeout-s must be positive, got {s}")),
        },
    })
}

fn run(args: &[String]) -> Result<i32, String> {
    let (cmd, rest) = args.split_first().ok_or("missing subcommand")?;
    match cmd.as_str() {
        "serve" => {
            let f = Flags::parse(rest, &["port"])?;
            serve::serve(f.req_num("port")?).map_err(|e| format!("serve: {e}"))?;
            Ok(0)
        }
        "client" => {
            stop::install_term_flag();
            Ok(client::run(client_opts(&Flags::parse(
                rest,
                CLIENT_FLAGS,
            )?)?))
        }
        "redis-client" => {
            stop::install_term_flag();
            Ok(redis::client(client_opts(&Flags::parse(
                rest,
                CLIENT_FLAGS,
            )?)?))
        }
        "redis-load" => {
            let f = Flags::parse(rest, &["addr", "keys", "value-size", "seed"])?;
            let out = redis::load(
                f.req_num("addr")?,
                f.req_num("keys")?,
                f.req_num("value-size")?,
                f.num("seed")?.unwrap_or(DEFAULT_SEED),
            )
            .map_err(|e| format!("redis-load: {e}"))?;
            println!("{out}");
            Ok(0)
        }
        "redis-digest" => {
            let f = Flags::parse(rest, &["addr", "match"])?;
            let out = redis::digest(f.req_num("addr")?, f.opt("match"))
                .map_err(|e| format!("redis-digest: {e}"))?;
            println!("{out}");
            Ok(0)
        }
        "expected-digest" => {
            let f = Flags::parse(rest, &["keys", "value-size", "seed"])?;
            println!(
                "{}",
                redis::expected_digest(
                    f.req_num("keys")?,
                    f.req_num("value-size")?,
                    f.num("seed")?.unwrap_or(DEFAULT_SEED)
                )
            );
            Ok(0)
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("ferry-workload: {e}\n{USAGE}");
            ExitCode::from(64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::serve::answer;

    #[test]
    fn protocol_answers() {
        assert_eq!(answer("PING\n").as_deref(), Some("PONG\n"));
        let a: i64 = answer("INCR\r\n").unwrap().trim().parse().unwrap();
        let b: i64 = answer("GET\n").unwrap().trim().parse().unwrap();
        assert!(b >= a);
        assert!(answer("QUIT\n").is_none());
        assert!(answer("NOPE\n").unwrap().starts_with("ERR"));
    }
}

//! A small Docker Engine API client and the inspect-to-create mapping.
//!
//! ferry keeps Docker the owner of a migrated container: the target container is created and
//! started (`?checkpoint=`) through the target's daemon, so `docker ps/logs/exec/stop` keep
//! working afterwards. This crate is the part of ferry that talks to those daemons.
//!
//! - [`Docker`]: one HTTP/1.1 connection per call over a Unix socket (or plain tcp://), a
//!   deadline on every call, daemon errors carried with the call that failed.
//! - [`ContainerView`]: the typed subset of `docker inspect` a migration decides on,
//!   normalised across Docker versions.
//! - [`create_body_from_inspect`]: the `POST /containers/create` body that recreates a
//!   container elsewhere with the same image, config, IPs and MACs; [`FIELD_RULES`] lists every
//!   field not copied verbatim and why.
//!
//! Versions: Docker 20.10 (API 1.41) to 28+ are supported; [`Docker::connect`] negotiates
//! min(daemon, 1.44). Calls are those that exist across that whole range; where the range
//! differs (several networks at create, where the MAC goes), the client bridges it.
//!
//! Tests: `tests/fixtures.rs` (inspect JSON of 20.10 and 28), `tests/fake_daemon.rs` (a scripted
//! daemon on a Unix socket) always run. `tests/live.rs` runs against a real daemon when
//! `FERRY_DOCKER_TEST_HOST` is set; `scripts/private-dockerd.sh start` makes a throw-away one in
//! its own network namespace (`FERRYTEST_EXPERIMENTAL=1` for the checkpoint part).

mod client;
mod error;
mod host;
mod images;
mod recreate;
mod util;
mod view;

pub use client::{Docker, DEFAULT_LONG_TIMEOUT, DEFAULT_TIMEOUT};
pub use error::DockerError;
pub use host::{Endpoint, DEFAULT_HOST};
pub use recreate::{create_body_from_inspect, FieldRule, Treatment, FIELD_RULES};
pub use util::{ApiVersion, MAX_API_VERSION, MIN_API_VERSION};
pub use view::{ContainerView, MountView, NetworkEndpoint};

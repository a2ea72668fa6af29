//! A small Docker Engine API client and the inspect-to-create mapping.
//!
//! ferry keeps Docker the owner of a migrated container: the target container is created and
//! started (`?checkpoint=`) through the target's daemon, so `docker ps/logs/exec/stop` keep
//! working afterwards. This crate is the part of ferry that talks to those daemons.
//!
//! Versions: Docker 20.10 (API 1.41) to 28+ are supported; [`Docker::connect`] negotiates
//! min(daemon, 1.44). Calls are those that exist across that whole range.

mod client;
mod error;
mod host;
mod recreate;
mod util;
mod view;

pub use client::{Docker, DEFAULT_LONG_TIMEOUT, DEFAULT_TIMEOUT};
pub use error::DockerError;
pub use host::{Endpoint, DEFAULT_HOST};
pub use recreate::{create_body_from_inspect, FieldRule, Treatment, FIELD_RULES};
pub use util::{ApiVersion, MAX_API_VERSION, MIN_API_VERSION};
pub use view::{ContainerView, MountView, NetworkEndpoint};

//! The network side of a migration, acting on a container's network namespace addressed by
//! the pid of any process inside it.
//!
//! Order during a migration: [`lock`] at freeze (the source must stay silent), [`set_arp`] off
//! on the source before the target announces itself with [`gratuitous_arp`]; on rollback
//! [`unlock`], [`remove_criu_lock`] and [`set_arp`] on again.
//!
//! External tools run from the host's mount namespace via `nsenter --net`, so only the host
//! needs `ip` and `iptables` (the container image does not). Their structured output
//! (`ip -j`, `iptables-save`) is parsed, never their prose.

mod arp;
mod error;
mod iface;
mod lock;
mod repair;
mod tool;

pub use arp::{
    announce_all_here, build_garp_frame, gratuitous_arp, set_arp, Announced, GARP_INTERVAL,
};
pub use error::NetError;
pub use iface::{interfaces, parse_ip_addr_json, parse_mac, Iface};
pub use lock::{
    is_locked, lock, parse_iptables_save, remove_criu_lock, unlock, FilterTable, CRIU_CHAIN,
    LOCK_CHAIN,
};
pub use repair::repair_off;

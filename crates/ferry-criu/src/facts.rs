use std::path::Path;
use std::time::Duration;

use ferry_proto::CriuFeatures;

use crate::proc::{quote_text, run, ToolError};

const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub struct CriuFacts {
    pub version: String,
    pub features: CriuFeatures,
    /// Output of a failed `criu check`, quoted.
    pub check_log: Vec<String>,
}

/// Parses `criu --version` ("Version: 4.2.1" on its own line).
pub fn parse_criu_version(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Version:")
            .map(|v| v.trim().to_string())
    })
}

/// Parses `runc --version` ("runc version 1.1.5+ds1").
pub fn parse_runc_version(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix("runc version")
            .map(|v| v.trim().to_string())
    })
}

/// Version and the features a migration needs. `criu check` without a feature exercises TCP
/// repair among the basics, so its success is what `tcp_established` means here.
pub async fn criu_facts(criu: &str) -> Result<CriuFacts, ToolError> {
    // Independent probes, run side by side: one after the other they were ~100 ms of every
    // migration's preflight, on each host.
    let feature = |name: &'static str| feature_status(criu, name);
    let (out, basic, uffd, uffd_noncoop, dirty, nft, lazy_read) = tokio::join!(
        run("criu --version", criu, &["--version"], PROBE_TIMEOUT),
        run("criu check", criu, &["check"], PROBE_TIMEOUT),
        feature("uffd"),
        feature("uffd-noncoop"),
        feature("mem_dirty_track"),
        feature("network_lock_nftables"),
        feature("lazy_pages_read"),
    );
    let out = out?.ok_or("criu --version", criu)?;
    let version = parse_criu_version(&out.stdout).ok_or_else(|| ToolError::Other {
        step: "criu --version".into(),
        message: format!("unrecognised output from {criu} --version"),
        log: quote_text(&out.stdout),
    })?;
    let basic = basic?;
    let mut facts = CriuFacts {
        version,
        ..Default::default()
    };
    facts.features.tcp_established = basic.status == 0;
    if basic.status != 0 {
        facts.check_log = quote_text(&format!("{}\n{}", basic.stdout, basic.stderr));
    }
    facts.features.uffd = uffd?;
    facts.features.uffd_noncoop = uffd_noncoop?;
    facts.features.mem_dirty_track = dirty?;
    facts.features.network_lock_nftables = nft?;
    facts.features.lazy_pages_read = lazy_read?;
    Ok(facts)
}

/// Whether `criu check --feature name` succeeds; an error when criu cannot even run.
async fn feature_status(criu: &str, name: &str) -> Result<bool, ToolError> {
    run(
        "criu check --feature",
        criu,
        &["check", "--feature", name],
        PROBE_TIMEOUT,
    )
    .await
    .map(|o| o.status == 0)
}

/// Whether `criu check --feature name` succeeds (false when it cannot even run).
pub async fn has_feature(criu: &str, name: &str) -> bool {
    feature_status(criu, name).await.unwrap_or(false)
}

pub async fn runc_version(runc: &str) -> Result<String, ToolError> {
    let out = run("runc --version", runc, &["--version"], PROBE_TIMEOUT)
        .await?
        .ok_or("runc --version", runc)?;
    parse_runc_version(&out.stdout).ok_or_else(|| ToolError::Other {
        step: "runc --version".into(),
        message: format!("unrecognised output from {runc} --version"),
        log: quote_text(&out.stdout),
    })
}

/// `criu cpuinfo dump` into a scratch dir, returned as the image's bytes.
pub async fn cpuinfo_dump(criu: &str, scratch: &Path) -> Result<Vec<u8>, ToolError> {
    let dir = scratch.to_string_lossy().into_owned();
    std::fs::create_dir_all(scratch).map_err(|e| ToolError::Other {
        step: "criu cpuinfo dump".into(),
        message: format!("cannot create {dir}: {e}"),
        log: vec![],
    })?;
    run(
        "criu cpuinfo dump",
        criu,
        &["cpuinfo", "dump", "-D", &dir],
        PROBE_TIMEOUT,
    )
    .await?
    .ok_or("criu cpuinfo dump", criu)?;
    std::fs::read(scratch.join("cpuinfo.img")).map_err(|e| ToolError::Other {
        step: "criu cpuinfo dump".into(),
        message: format!("no cpuinfo.img in {dir}: {e}"),
        log: vec![],
    })
}

/// `criu cpuinfo check` of a peer's CPU image against this host: `Ok(Ok(()))` when compatible,
/// `Ok(Err(lines))` with CRIU's reasons when not.
pub async fn cpuinfo_check(
    criu: &str,
    scratch: &Path,
    image: &[u8],
) -> Result<Result<(), Vec<String>>, ToolError> {
    let dir = scratch.to_string_lossy().into_owned();
    let io = |e: std::io::Error| ToolError::Other {
        step: "criu cpuinfo check".into(),
        message: format!("{dir}: {e}"),
        log: vec![],
    };
    std::fs::create_dir_all(scratch).map_err(io)?;
    std::fs::write(scratch.join("cpuinfo.img"), image).map_err(io)?;
    let out = run(
        "criu cpuinfo check",
        criu,
        &["cpuinfo", "check", "-D", &dir],
        PROBE_TIMEOUT,
    )
    .await?;
    if out.status == 0 {
        Ok(Ok(()))
    } else {
        Ok(Err(quote_text(&format!("{}\n{}", out.stdout, out.stderr))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_criu_version("Version: 4.2.1\n").as_deref(),
            Some("4.2.1")
        );
        assert_eq!(
            parse_criu_version("Version: 3.17.1\nGitID: v3.17\n").as_deref(),
            Some("3.17.1")
        );
        assert_eq!(parse_criu_version("nothing"), None);
        assert_eq!(
            parse_runc_version("runc version 1.1.5+ds1\ncommit: x\n").as_deref(),
            Some("1.1.5+ds1")
        );
    }
}

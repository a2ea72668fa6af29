//! Arbitrary bytes into the decoder and applier: must never panic, and must never leave
//! anything but a complete tree (or nothing) in the destination.
#![no_main]

use ferry_fs::{ApplyOptions, StreamReader, TreeMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let dest = dir.path().join("dest");
    let mode = if data.get(10) == Some(&1) { TreeMode::OverlayUpper } else { TreeMode::Plain };
    let applied = StreamReader::new(data).and_then(|r| r.apply_into(&dest, &ApplyOptions::fresh(mode)));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    match applied {
        Ok(_) => assert_eq!(names, vec![std::ffi::OsString::from("dest")]),
        Err(_) => assert!(names.is_empty(), "failed apply left {names:?}"),
    }
});

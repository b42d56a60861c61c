//! Output files are checked before anything is measured: a typo in `--json` or `--plot`
//! should cost a second, not a full run.

use std::fs::OpenOptions;
use std::path::Path;

use super::BenchError;

/// Checks that `path` can be written: its directory exists and is writable, and `path` is not
/// a directory. Leaves no file behind (an existing file is opened without truncating it).
/// `option` names the command-line option in the message.
pub fn check_writable(path: &Path, option: &str) -> Result<(), BenchError> {
    let fail = |why: String| BenchError::Output(format!("{option} {}: {why}", path.display()));
    if path.is_dir() {
        return Err(fail("is a directory, not a file".into()));
    }
    if path.exists() {
        return OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| fail(format!("cannot be written: {e}")));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(fail(format!(
            "directory {} does not exist (create it first)",
            dir.display()
        )));
    }
    let probe = dir.join(format!(".smpcall-bench-write-test-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(fail(format!(
            "directory {} is not writable: {e}",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_missing_directories_and_directories() {
        let dir = std::env::temp_dir();
        assert!(check_writable(&dir.join("smpcall-no-such-dir/x.json"), "--json").is_err());
        let e = check_writable(&dir, "--json").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let ok = dir.join(format!("smpcall-output-test-{}.json", std::process::id()));
        check_writable(&ok, "--json").unwrap();
        assert!(!ok.exists(), "the check leaves no file behind");
    }
}

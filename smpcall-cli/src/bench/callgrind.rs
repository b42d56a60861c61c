//! Instruction counts from callgrind, split into labelled segments by the program itself.
//!
//! A program run under `valgrind --tool=callgrind` calls [`segment`]`(label)` to end a
//! segment: callgrind writes everything executed since the previous segment to a dump file
//! whose description is the label, and starts counting from zero again. [`run`] runs a command
//! under callgrind and returns the instruction count of every label (segments with the same
//! label add up). Outside valgrind [`segment`] does nothing (a few no-op instructions).
//!
//! The client request is valgrind's documented "special instruction sequence" for amd64
//! (`valgrind.h`): on other architectures [`segment`] does nothing and [`available`] says so.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a probe may run under callgrind before [`run`] gives up on it.
pub const RUN_BOUND: Duration = Duration::from_secs(600);

/// `VG_USERREQ_TOOL_BASE('C','T')`: callgrind's client requests.
const CALLGRIND_BASE: usize = ((b'C' as usize) << 24) | ((b'T' as usize) << 16);
/// `VG_USERREQ__DUMP_STATS_AT`: dump (and zero) the counts, with a description string.
const DUMP_STATS_AT: usize = CALLGRIND_BASE + 3;
/// `VG_USERREQ__RUNNING_ON_VALGRIND`.
const RUNNING_ON_VALGRIND: usize = 0x1001;

/// Issues a valgrind client request; returns `default` when not running under valgrind.
#[cfg(target_arch = "x86_64")]
fn client_request(default: usize, args: &[usize; 6]) -> usize {
    let mut result = default;
    // SAFETY: valgrind's amd64 "special instruction" preamble: four rotations of rdi by a
    // total of 128 bits (rdi unchanged) and `xchg rbx, rbx` (rbx unchanged). Natively it does
    // nothing but set flags; under valgrind, valgrind reads the six words at rax and writes
    // the result to rdx. `args` outlives the call; no stack use.
    unsafe {
        core::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            in("rax") args.as_ptr(),
            inout("rdx") result,
            options(nostack),
        );
    }
    result
}

#[cfg(not(target_arch = "x86_64"))]
fn client_request(default: usize, _args: &[usize; 6]) -> usize {
    default
}

/// Whether this process runs under valgrind.
pub fn running_on_valgrind() -> bool {
    client_request(0, &[RUNNING_ON_VALGRIND, 0, 0, 0, 0, 0]) != 0
}

/// Whether segment counts can be taken here: an amd64 build and `valgrind` on the `PATH`.
pub fn available() -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("instruction counts need an x86_64 build (valgrind client requests)".into());
    }
    match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("valgrind is not on the PATH (install valgrind for instruction counts)".into()),
    }
}

/// Ends the current segment: everything executed since the previous one is counted under
/// `label`. Make labels with [`label`] *before* the measured code (building one allocates).
#[inline]
pub fn segment(label: &CStr) {
    client_request(0, &[DUMP_STATS_AT, label.as_ptr() as usize, 0, 0, 0, 0]);
}

/// A segment label (NUL bytes in `text` are dropped).
pub fn label(text: &str) -> CString {
    CString::new(text.replace('\0', "")).expect("no NUL left")
}

/// What callgrind counted in the segments of one label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    /// Instructions, all segments of the label together.
    pub total: u64,
    /// Segments with this label.
    pub segments: u64,
    /// Instructions by the source line they come from — the innermost inlined function's
    /// line, so code inlined into its callers is still counted where it is written — and the
    /// (not inlined) function executing it. Calls' inclusive costs are not included (their
    /// callees' own lines are).
    pub by_line: BTreeMap<(String, u32, String), u64>,
    /// Instructions by the (not inlined) function callgrind saw executing them.
    pub by_function: BTreeMap<String, u64>,
}

/// Runs `exe args…` under callgrind with its dump files in `dir`, and returns what was counted
/// under every segment label the program wrote (summed over segments with the same label).
pub fn run(exe: &Path, args: &[String], dir: &Path) -> Result<BTreeMap<String, Profile>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out_file = dir.join("callgrind.out");
    let log = dir.join("stderr.log");
    let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    // Bounded: the probes are short and deterministic; one that runs this long is stuck.
    let deadline = Instant::now() + RUN_BOUND;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "valgrind {} {} did not finish within {RUN_BOUND:?}",
                    exe.display(),
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("waiting for valgrind: {e}")),
        }
    };
    if !status.success() {
        return Err(format!(
            "valgrind {} {} failed ({status}):\n{}",
            exe.display(),
            args.join(" "),
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some((label, total)) = parse_dump(&text) {
            let p = profiles.entry(label).or_default();
            p.total += total;
            p.segments += 1;
            parse_lines(&text, p);
        }
    }
    Ok(profiles)
}

/// The label and the instruction total of one dump file written by [`segment`].
pub fn parse_dump(text: &str) -> Option<(String, u64)> {
    let mut label = None;
    let mut total = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("desc: Trigger: Client Request: ") {
            label = Some(rest.trim().to_string());
        } else if let Some(rest) = line
            .strip_prefix("totals: ")
            .or_else(|| line.strip_prefix("summary: "))
        {
            total = rest.split_whitespace().next()?.parse().ok();
        }
    }
    Some((label?, total?))
}

/// Adds the self cost of every source line (and function) of a dump file (`positions: line`,
/// `events: Ir`, name compression) to `p`.
fn parse_lines(text: &str, p: &mut Profile) {
    let mut names: BTreeMap<(&str, String), String> = BTreeMap::new();
    // Resolves `(id) name` / `(id)` name compression; files share one id space, as do fns.
    let mut resolve = |kind: &'static str, v: &str| -> String {
        let v = v.trim();
        if let Some(rest) = v.strip_prefix('(') {
            if let Some((id, name)) = rest.split_once(')') {
                let key = (kind, id.to_string());
                let name = name.trim();
                if name.is_empty() {
                    return names.get(&key).cloned().unwrap_or_default();
                }
                names.insert(key, name.to_string());
                return name.to_string();
            }
        }
        v.to_string()
    };
    let (mut file, mut inlined, mut func) = (String::new(), None::<String>, String::new());
    let mut last_line: i64 = 0;
    let mut skip_next = false;
    for line in text.lines() {
        let Some(first) = line.chars().next() else {
            continue;
        };
        if first.is_ascii_digit() || first == '+' || first == '-' || first == '*' {
            let mut parts = line.split_whitespace();
            let pos = parts.next().unwrap_or("0");
            let n: i64 = match pos.as_bytes()[0] {
                b'+' => last_line + pos[1..].parse::<i64>().unwrap_or(0),
                b'-' => last_line - pos[1..].parse::<i64>().unwrap_or(0),
                b'*' => last_line,
                _ => pos.parse().unwrap_or(0),
            };
            last_line = n;
            let cost: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            if std::mem::take(&mut skip_next) {
                continue; // a call's inclusive cost
            }
            let f = inlined.clone().unwrap_or_else(|| file.clone());
            *p.by_line
                .entry((f, n.max(0) as u32, func.clone()))
                .or_insert(0) += cost;
            *p.by_function.entry(func.clone()).or_insert(0) += cost;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "fl" => {
                file = resolve("file", value);
                inlined = None;
            }
            "fi" | "fe" => {
                let f = resolve("file", value);
                inlined = (f != file).then_some(f);
            }
            "fn" => func = resolve("fn", value),
            "cfi" | "cfl" => {
                resolve("file", value);
            }
            "cfn" => {
                resolve("fn", value);
            }
            "calls" => skip_next = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_dump_header() {
        let text = "version: 1\ncreator: callgrind-3.19.0\npid: 1\ncmd: x\npart: 2\n\n\
                    desc: I1 cache: \ndesc: Trigger: Client Request: n=8 async sender\n\n\
                    positions: line\nevents: Ir\nsummary: 1234\n\nfl=(1) a.rs\n";
        assert_eq!(parse_dump(text), Some(("n=8 async sender".into(), 1234)));
        assert_eq!(parse_dump("events: Ir\nsummary: 5\n"), None);
    }

    #[test]
    fn lines_are_attributed_through_inlining_and_calls_are_skipped() {
        let text = "events: Ir\nfl=(1) /a.rs\nfn=(1) outer\n10 5\n+2 3\n\
                    fi=(2) /b.rs\n7 4\nfe=(1)\ncfn=(2) callee\ncalls=1 0\n* 100\n\
                    fl=(2)\nfn=(2)\n20 1\n";
        let mut p = Profile::default();
        parse_lines(text, &mut p);
        let get = |f: &str, l, func: &str| {
            p.by_line
                .get(&(f.to_string(), l, func.to_string()))
                .copied()
        };
        assert_eq!(get("/a.rs", 10, "outer"), Some(5));
        assert_eq!(get("/a.rs", 12, "outer"), Some(3));
        assert_eq!(get("/b.rs", 7, "outer"), Some(4));
        assert_eq!(get("/b.rs", 20, "callee"), Some(1));
        assert_eq!(p.by_function.get("outer"), Some(&12));
        assert_eq!(p.by_function.get("callee"), Some(&1));
    }

    #[test]
    fn requests_are_no_ops_natively() {
        if !running_on_valgrind() {
            segment(&label("nothing happens"));
        }
    }
}

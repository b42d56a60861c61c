//! Parsing of human-written durations for the command line: `3s`, `500ms`, `1m 30s`, `2`.

use std::time::Duration;

/// Parses a duration with `humantime` (`3s`, `500ms`, `1m 30s`, `2us`…); a bare number is
/// seconds (`2` = 2 s, `1.5` = 1.5 s).
///
/// ```
/// use std::time::Duration;
/// use smpcall_cli::duration::parse_duration;
/// assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
/// assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|e| format!("invalid duration `{text}`: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration `{text}`: {e} (e.g. 3s, 500ms, 2)"))
}

/// Parses a bound on a wait, as [`parse_duration`], and refuses zero: a zero bound would
/// expire before any CPU could start.
///
/// ```
/// use std::time::Duration;
/// use smpcall_cli::duration::parse_timeout;
/// assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
/// assert!(parse_timeout("0").is_err());
/// assert!(parse_timeout("0s").is_err());
/// ```
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!(
            "invalid timeout `{text}`: it must be greater than zero (e.g. 30s)"
        )),
        d => Ok(d),
    }
}

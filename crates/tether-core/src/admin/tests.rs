use super::api::*;
use super::*;

#[test]
fn since_and_limit_parse() {
    assert_eq!(parse_since("1700000000000").unwrap(), 1_700_000_000_000);
    assert!(parse_since("2026-11-21T10:00:00Z").unwrap() > 1_700_000_000_000);
    assert!(parse_since("1h").unwrap() < now_ms());
    assert!(parse_since("yesterday-ish").is_err());
    // Issue 26: out of range is a 400, not a negative window.
    for bad in [
        "1000000000000h",
        "-5",
        "1969-01-01T00:00:00Z",
        "99999999999999999",
    ] {
        assert!(parse_since(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_limit(None, 50, 500).unwrap(), 50);
    assert_eq!(parse_limit(Some("10"), 50, 500).unwrap(), 10);
    assert!(parse_limit(Some("0"), 50, 500).is_err());
    assert!(parse_limit(Some("501"), 50, 500).is_err());
    assert!(parse_limit(Some("x"), 50, 500).is_err());
}

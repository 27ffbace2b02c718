//! Structured logs: `--log-format json` gives one JSON object per line; a
//! refused write is one line with its domain, reason, token and epoch; a
//! raise is logged; an admitted request logs nothing at info.

use crate::support::{Fencegate, FencegateConfig, Nginx};
use serde_json::Value;

fn put(fg: &Fencegate, path: &str, token: u64) -> u16 {
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nFencing-Token: {token}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    );
    crate::support::parse_response(&crate::support::raw_request(&fg.addr(), request.as_bytes())).status
}

#[test]
fn json_logs_have_one_line_per_refusal_and_none_per_admitted_write() {
    let nginx = Nginx::start();
    let mut fg = Fencegate::init_only(FencegateConfig::new(&nginx.url()).domain("orders", "/orders/"));
    fg.start_again_with(&["--log-format", "json"]);

    assert_eq!(put(&fg, "/orders/a", 7), 201, "the first write raises to 7");
    for i in 0..20 {
        assert!(matches!(put(&fg, &format!("/orders/ok-{i}"), 7), 201 | 204));
    }
    assert_eq!(put(&fg, "/orders/late", 3), 412);
    assert_eq!(put(&fg, "/orders/late", 5), 412);
    fg.terminate();

    let lines: Vec<Value> = fg
        .stderr_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let message = |v: &Value| v["fields"]["message"].as_str().unwrap_or_default().to_string();
    let refused: Vec<&Value> = lines.iter().filter(|v| message(v) == "write refused").collect();
    assert_eq!(refused.len(), 2, "one line per refused write: {lines:#?}");
    for (line, token) in refused.iter().zip([3, 5]) {
        let f = &line["fields"];
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(f["domain"], "orders", "{line}");
        assert_eq!(f["reason"], "stale_epoch", "{line}");
        assert_eq!(f["token"], token, "{line}");
        assert_eq!(f["epoch"], 7, "{line}");
    }
    let raised: Vec<&Value> = lines.iter().filter(|v| message(v) == "epoch raised").collect();
    assert_eq!(raised.len(), 1, "{lines:#?}");
    assert_eq!(raised[0]["fields"]["to"], 7);
    // 21 admitted writes, 2 refusals, 1 raise: nothing else per request.
    let per_request = lines
        .iter()
        .filter(|v| v["level"] == "INFO" && v.to_string().contains("/orders/ok-"))
        .count();
    assert_eq!(per_request, 0, "admitted requests are not logged at info");
    assert!(
        lines.len() < 20,
        "{} log lines for 23 requests: something logs per request:\n{lines:#?}",
        lines.len()
    );
}

//! Proves the harness itself: nginx as a WebDAV store, the scripted store,
//! and the raw-socket client. No fencegate involved.

use crate::support::{client, parse_response, raw_request, EventKind, Nginx, ScriptedStore};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn nginx_stores_puts_and_logs_tokens() {
    let mut nginx = Nginx::start();
    let http = client();

    let put = http
        .put(format!("{}/smoke/dir/a.txt", nginx.url()))
        .header("Fencing-Token", "7")
        .body("hello")
        .send()
        .await
        .expect("PUT to nginx");
    assert_eq!(put.status().as_u16(), 201, "new file");

    let put = http
        .put(format!("{}/smoke/dir/a.txt", nginx.url()))
        .header("Fencing-Token", "8")
        .body("hello again")
        .send()
        .await
        .expect("PUT to nginx");
    assert_eq!(put.status().as_u16(), 204, "overwrite");

    let get = http
        .get(format!("{}/smoke/dir/a.txt", nginx.url()))
        .send()
        .await
        .expect("GET from nginx");
    assert_eq!(get.status().as_u16(), 200);
    assert_eq!(get.text().await.unwrap(), "hello again");
    assert_eq!(
        std::fs::read_to_string(nginx.data_dir().join("smoke/dir/a.txt")).unwrap(),
        "hello again"
    );

    let raw = raw_request(
        &nginx.addr(),
        b"DELETE /smoke/dir/a.txt HTTP/1.1\r\nHost: x\r\nFencing-Token: 9\r\n\r\n",
    );
    assert_eq!(parse_response(&raw).status, 204, "{raw}");

    let log = nginx.log_entries_at_least(4);
    let summary: Vec<_> = log
        .iter()
        .map(|e| (e.method.as_str(), e.uri.as_str(), e.token.as_deref(), e.status))
        .collect();
    assert_eq!(
        summary,
        [
            ("PUT", "/smoke/dir/a.txt", Some("7"), 201),
            ("PUT", "/smoke/dir/a.txt", Some("8"), 204),
            ("GET", "/smoke/dir/a.txt", None, 200),
            ("DELETE", "/smoke/dir/a.txt", Some("9"), 204),
        ]
    );

    nginx.stop().expect("nginx was running");
    assert!(
        std::net::TcpStream::connect(nginx.addr()).is_err(),
        "nginx still listens after stop"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scripted_store_records_order_and_holds() {
    let store = ScriptedStore::start().await;
    store.hold_token("5", Duration::from_millis(300));
    let http = client();

    let held = tokio::spawn({
        let (http, url) = (http.clone(), format!("{}/x/held", store.url()));
        async move { http.put(url).header("Fencing-Token", "5").body("a").send().await }
    });
    assert!(
        store
            .wait_for(Duration::from_secs(5), |ev| ev
                .iter()
                .any(|e| e.kind == EventKind::BodyComplete))
            .await
    );
    let quick = http
        .put(format!("{}/x/quick?q=1", store.url()))
        .header("Fencing-Token", "6")
        .body("bb")
        .send()
        .await
        .expect("PUT quick");
    assert_eq!(quick.status().as_u16(), 201);
    assert_eq!(held.await.unwrap().expect("PUT held").status().as_u16(), 201);

    let order: Vec<_> = store
        .events()
        .iter()
        .map(|e| (e.token.clone().unwrap(), e.kind))
        .collect();
    use EventKind::*;
    let t = |s: &str| s.to_string();
    assert_eq!(
        order,
        [
            (t("5"), HeadArrived),
            (t("5"), BodyComplete),
            (t("6"), HeadArrived),
            (t("6"), BodyComplete),
            (t("6"), Responded),
            (t("5"), Responded),
        ]
    );
    let quick_body = store
        .events_for("6")
        .into_iter()
        .find(|e| e.kind == BodyComplete)
        .unwrap();
    assert_eq!(&quick_body.body[..], b"bb");
    assert_eq!(quick_body.path, "/x/quick");
    assert_eq!(quick_body.query.as_deref(), Some("q=1"));
    store.stop();
}

//! The participants' chat page in a real browser: Debian's headless Chromium, driven by
//! `tests/browser/chat.mjs` (puppeteer-core), against a standalone chat with Apertium behind a TCP
//! proxy this test cuts and restores.

use std::{process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{
    proxy::{Mode, Proxy},
    support::*,
};

/// The page's first load, as transferred, must stay under this.
const FIRST_LOAD_LIMIT: usize = 200 * 1024;

/// The driver's next line.
async fn next(said: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(120), said.next_line()).await.expect("the driver answers").unwrap()
}

#[tokio::test]
async fn two_participants_in_two_languages_chat_through_the_page_and_a_dropped_network_loses_nothing() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser");
    assert!(
        dir.join("node_modules/puppeteer-core").exists(),
        "the browser test's driver is not installed: run (cd tests/browser && npm ci), as scripts/test does"
    );
    let chromium = std::env::var("PARLEY_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&chromium).exists(), "no {chromium}: apt-get install chromium (scripts/test does)");
    let apertium = Apertium::start().await;
    let url = apertium.url.clone();
    let server =
        Server::start(&["standalone", "--languages", "es,ca", "--translator", "apertium", "--translator-url", &url])
            .await;
    let (proxy, page_url) = Proxy::in_front_of(&format!("http://127.0.0.1:{}/", server.port)).await;
    // A process of its own, so no other test shares the room.
    let room = "town-hall".to_owned();
    // Screenshots go where PARLEY_SCREENSHOTS says (docs/screenshots to refresh the README's), else
    // beside the test's logs.
    let screenshots =
        std::env::var("PARLEY_SCREENSHOTS").unwrap_or_else(|_| std::env::temp_dir().display().to_string());

    let mut driver = tokio::process::Command::new("node")
        .arg(dir.join("chat.mjs"))
        .envs([
            ("PAGE_URL", page_url.as_str()),
            ("ROOM", &room),
            ("SCREENSHOTS", &screenshots),
            ("CHROMIUM", &chromium),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs tests/browser/chat.mjs");
    let mut stdin = driver.stdin.take().unwrap();
    let mut said = BufReader::new(driver.stdout.take().unwrap()).lines();

    let loaded = next(&mut said).await.expect("the driver reports the first load");
    let bytes: usize = loaded.strip_prefix("LOADED ").expect("LOADED <bytes>").parse().unwrap();
    eprintln!("the page's first load transferred {bytes} bytes");
    assert!(bytes < FIRST_LOAD_LIMIT, "the first load transferred {bytes} bytes");
    assert!(bytes > 1000, "the first load was measured ({bytes} bytes)");

    assert_eq!(
        next(&mut said).await.as_deref(),
        Some("CUT"),
        "the driver got through sending, translating and reloading"
    );
    proxy.set(Mode::Cut);
    assert_eq!(next(&mut said).await.as_deref(), Some("DOWN"), "both pages saw the connection drop");
    let mut ids = Vec::new();
    for text in ["Thank you", "See you tomorrow"] {
        ids.push(send(&server.http(), &room, text).await);
    }
    proxy.set(Mode::Forward);
    stdin.write_all(format!("SENT {}\n", ids.join(" ")).as_bytes()).await.unwrap();
    assert_eq!(next(&mut said).await.as_deref(), Some("OK"), "both pages show what was sent while they were cut off");
    let status = tokio::time::timeout(Duration::from_secs(30), driver.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the driver failed: {status}");
}

#[test]
fn the_page_addresses_everything_relative_to_itself_so_it_works_behind_a_path_prefix() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gateway/page");
    for file in ["index.html", "app.js", "style.css"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for absolute in ["\"/graphql", "'/graphql", "`/graphql", "src=\"/", "href=\"/", "url(/", "https://cdn"] {
            assert!(!text.contains(absolute), "{file} names {absolute:?}, which a path prefix would break");
        }
    }
}

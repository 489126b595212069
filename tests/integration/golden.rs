//! Golden parse fixtures: tests/fixtures/parse/NAME.eml against NAME.expect.json, whose values
//! tests/fixtures/make_fixtures.py wrote from what it encoded (not from mailpump's output).

use mailpump::parse::{self, Limits};
use serde_json::Value;

use crate::harness::root;

fn fixtures() -> Vec<(String, Vec<u8>, Value)> {
    let dir = root().join("tests/fixtures/parse");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("eml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let raw = std::fs::read(&path).unwrap();
        let expect: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.expect.json"))).unwrap(),
        )
        .unwrap();
        out.push((name, raw, expect));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_fixture_parses_to_its_expected_document() {
    let all = fixtures();
    let names: Vec<&str> = all.iter().map(|f| f.0.as_str()).collect();
    for required in [
        "plain",
        "alternative",
        "attachments",
        "nested",
        "gb2312",
        "gbk",
        "gb18030",
        "big5",
        "iso2022jp",
        "shift_jis",
        "euc_kr",
        "utf8_raw_headers",
        "rfc2231",
        "no_message_id",
        "no_date",
        "malformed_headers",
        "broken_boundary",
        "unterminated_multipart",
        "invalid_base64",
        "binary_garbage",
    ] {
        assert!(names.contains(&required), "fixture {required} is missing");
    }
    let mut failures = Vec::new();
    for (name, raw, expect) in &all {
        let parsed = parse::parse(raw.clone(), Limits::default());
        let actual = serde_json::to_value(&parsed).unwrap();
        for (key, want) in expect.as_object().unwrap() {
            match key.as_str() {
                "_note" => {}
                "_parse_errors" => {
                    if want.as_bool().unwrap() == parsed.parse_errors.is_empty() {
                        failures.push(format!(
                            "{name}: parse_errors = {:?}, expected {}",
                            parsed.parse_errors,
                            if want.as_bool().unwrap() {
                                "some"
                            } else {
                                "none"
                            }
                        ));
                    }
                }
                _ => {
                    if &actual[key] != want {
                        failures.push(format!(
                            "{name}.{key}:\n  expected {want}\n  actual   {}",
                            actual[key]
                        ));
                    }
                }
            }
        }
        // the raw bytes are always kept whole: inline, these fixtures are all small
        assert_eq!(
            parsed.raw_data.as_ref(),
            Some(raw),
            "{name}: raw bytes intact"
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A 25 MB attachment: decoded size and hash exact, bytes handed to the store whole.
pub fn big_message(size: usize) -> (Vec<u8>, Vec<u8>) {
    use base64::Engine;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let mut raw = String::with_capacity(b64.len() * 103 / 100 + 1000);
    raw.push_str("From: a@example.com\r\nTo: b@example.com\r\nSubject: Big\r\nMessage-ID: <big@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"big.bin\"\r\n\r\n");
    for line in b64.as_bytes().chunks(76) {
        raw.push_str(std::str::from_utf8(line).unwrap());
        raw.push_str("\r\n");
    }
    raw.push_str("--b--\r\n");
    (raw.into_bytes(), data)
}

#[test]
fn a_25_mb_attachment_is_decoded_exactly() {
    let (raw, data) = big_message(25 * 1024 * 1024);
    let parsed = parse::parse(raw, Limits::default());
    assert!(parsed.parse_errors.is_empty(), "{:?}", parsed.parse_errors);
    assert_eq!(parsed.attachments.len(), 1);
    let a = &parsed.attachments[0];
    assert_eq!(a.size, data.len() as u64);
    assert_eq!(a.sha256, parse::sha256_hex(&data));
    assert_eq!(a.filename.as_deref(), Some("big.bin"));
    assert!(parsed
        .blobs
        .iter()
        .any(|b| b.sha256 == a.sha256 && b.bytes == data));
}

/// The malformed corpus (tests/fixtures/make_malformed.py), written to a temp dir.
pub fn malformed_corpus() -> (tempfile::TempDir, Vec<(String, Vec<u8>, bool)>) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .arg(root().join("tests/fixtures/make_malformed.py"))
        .arg(dir.path())
        .output()
        .expect("python3 runs the corpus generator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    let mut cases: Vec<(String, Vec<u8>, bool)> = manifest
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                std::fs::read(dir.path().join(name)).unwrap(),
                m["broken"].as_bool().unwrap(),
            )
        })
        .collect();
    cases.sort();
    (dir, cases)
}

#[test]
fn every_malformed_message_parses_to_a_storable_document_with_its_raw_bytes() {
    let (_dir, cases) = malformed_corpus();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    for (name, raw, broken) in &cases {
        let parsed = parse::parse(raw.clone(), Limits::default());
        assert_eq!(parsed.raw_bytes(), raw.as_slice(), "{name}: raw intact");
        if *broken {
            assert!(
                !parsed.parse_errors.is_empty(),
                "{name}: the damage is reported"
            );
        }
        let ready = mailpump::store::ReadyMessage {
            uid: 1,
            flags: vec![],
            internal_date: None,
            size: raw.len() as u64,
            parsed,
            gmail: None,
        };
        let doc = mailpump::store::message_document("a", "INBOX", 1, &ready, bson::DateTime::now());
        let size = bson::to_vec(&doc).expect("the document encodes").len();
        assert!(size < 16 * 1024 * 1024, "{name}: {size} bytes");
        // what the document holds of the raw bytes is them, exactly
        let stored = doc.get_document("raw").unwrap();
        match stored.get_binary_generic("data") {
            Ok(data) => assert_eq!(data, raw, "{name}: raw.data"),
            Err(_) => assert!(raw.len() > 256 * 1024, "{name}: a small message is inline"),
        }
    }
}

//! TLS, STARTTLS and certificate verification against a real Dovecot.

use bson::doc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::{message, AccountSpec, Dovecot, Mailpump, TestDb};

async fn sync_with(spec: AccountSpec) -> (crate::harness::mailpump::Run, TestDb) {
    let db = TestDb::new().await;
    let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
    (run, db)
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_and_starttls_work_with_a_private_ca() {
    let mut dc = Dovecot::start();
    let user = dc.add_user("tls", "pw-tls");
    dc.deliver(&user, &message("over tls", "1"));
    let ca = format!("ca_file = \"{}\"", dc.ca_file().display());

    let mut tls = AccountSpec::plain("tls", &dc, &user).with(ca.clone());
    tls.port = dc.imaps_port;
    tls.security = "tls";
    let (run, db) = sync_with(tls).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);

    let mut starttls = AccountSpec::plain("tls", &dc, &user).with(ca);
    starttls.security = "starttls";
    let (run, db) = sync_with(starttls).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_is_refused_unless_accept_invalid_certs() {
    let mut dc =
        Dovecot::start_with("ssl_cert = <@DIR@/selfsigned.pem\nssl_key = <@DIR@/selfsigned.key\n");
    let user = dc.add_user("self", "pw-self");
    dc.deliver(&user, &message("self-signed", "1"));
    let mut spec = AccountSpec::plain("self", &dc, &user);
    spec.port = dc.imaps_port;
    spec.security = "tls";

    let (run, db) = sync_with(spec.clone()).await;
    assert_eq!(run.code(), 1);
    let error = run.event("mailbox_sync_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("TLS") && error.contains("certificate"),
        "{error}"
    );
    assert_eq!(db.count("messages", doc! {}).await, 0);

    // the private CA of the other certificate does not vouch for this one either
    let (run, _) = sync_with(
        spec.clone()
            .with(format!("ca_file = \"{}\"", dc.ca_file().display())),
    )
    .await;
    assert_eq!(run.code(), 1);

    let (run, db) = sync_with(spec.with("accept_invalid_certs = true")).await;
    assert_eq!(run.code(), 0, "{}", run.stdout());
    assert_eq!(db.count("messages", doc! {}).await, 1);
}

/// A server that offers no STARTTLS: mailpump must refuse rather than log in in plain text.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_is_never_silently_downgraded() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"* OK IMAP4rev1 no tls here\r\n")
            .await
            .unwrap();
        let mut received = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            received.push(line.clone());
            let tag = line.split(' ').next().unwrap_or("*").to_string();
            if line.to_ascii_uppercase().contains("CAPABILITY") {
                w.write_all(
                    format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK done\r\n").as_bytes(),
                )
                .await
                .unwrap();
            } else {
                w.write_all(format!("{tag} BAD no\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        }
        received
    });
    let db = TestDb::new().await;
    let spec = AccountSpec {
        name: "down".into(),
        port,
        security: "starttls",
        username: "u".into(),
        password: "secret-pw".into(),
        extra: vec![],
    };
    let run = Mailpump::new(&db, &[spec]).run_async(&["sync"]).await;
    assert_eq!(run.code(), 1);
    let error = run.event("mailbox_sync_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("does not offer STARTTLS"), "{error}");
    let received = server.await.unwrap();
    assert!(
        received
            .iter()
            .all(|l| !l.contains("secret-pw") && !l.to_ascii_uppercase().contains("LOGIN")),
        "{received:?}"
    );
}

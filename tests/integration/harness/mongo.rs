//! The database side of a test: a fresh database per test on the server deploy/test.sh started
//! (`MAILPUMP_TEST_MONGODB_URI`), read with the same mongodb crate the daemon uses.

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{Client, Database};

pub struct TestDb {
    pub uri: String,
    pub name: String,
    pub db: Database,
}

pub fn mongo_uri() -> String {
    std::env::var("MAILPUMP_TEST_MONGODB_URI").unwrap_or_else(|_| {
        panic!("MAILPUMP_TEST_MONGODB_URI is not set: run the suite with `bash deploy/test.sh` (it starts SecantusDB), or point it at a MongoDB")
    })
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::on(&mongo_uri()).await
    }

    /// A fresh database on the server at `uri`.
    pub async fn on(uri: &str) -> TestDb {
        let uri = uri.to_string();
        let client = Client::with_uri_str(&uri).await.unwrap();
        let name = format!("t_{}", super::unique_id().replace('-', "_"));
        let db = client.database(&name);
        TestDb { uri, name, db }
    }

    /// The same server, another handle on database `name`.
    pub async fn with_name(self, name: &str) -> TestDb {
        let client = Client::with_uri_str(&self.uri).await.unwrap();
        TestDb {
            db: client.database(name),
            name: name.to_string(),
            uri: self.uri,
        }
    }

    pub async fn messages(&self, filter: Document) -> Vec<Document> {
        self.db
            .collection::<Document>("messages")
            .find(filter)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    pub async fn count(&self, collection: &str, filter: Document) -> u64 {
        self.db
            .collection::<Document>(collection)
            .count_documents(filter)
            .await
            .unwrap()
    }

    pub async fn mailbox(&self, id: &str) -> Option<Document> {
        self.db
            .collection::<Document>("mailboxes")
            .find_one(doc! {"_id": id})
            .await
            .unwrap()
    }

    /// The raw bytes of a message document: inline (`raw.data`) or from its blob
    /// (`raw.blob`), checked against `raw.sha256` and `raw.size`.
    pub async fn raw(&self, d: &Document) -> Vec<u8> {
        let raw = d.get_document("raw").expect("raw");
        let sha = raw.get_str("sha256").unwrap();
        let bytes = match raw.get_binary_generic("data") {
            Ok(data) => {
                assert!(
                    !raw.contains_key("blob"),
                    "raw is inline or a blob, not both"
                );
                data.clone()
            }
            Err(_) => self.blob(raw.get_str("blob").expect("raw.blob")).await,
        };
        assert_eq!(
            mailpump::parse::sha256_hex(&bytes),
            sha,
            "raw bytes match raw.sha256"
        );
        assert_eq!(bytes.len() as i64, raw.get_i64("size").unwrap());
        bytes
    }

    /// Reassembles a blob from its GridFS chunks.
    pub async fn blob(&self, sha: &str) -> Vec<u8> {
        let files = self
            .db
            .collection::<Document>("blobs.files")
            .find_one(doc! {"_id": sha})
            .await
            .unwrap()
            .expect("files document");
        let mut chunks: Vec<Document> = self
            .db
            .collection::<Document>("blobs.chunks")
            .find(doc! {"files_id": sha})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        chunks.sort_by_key(|c| c.get_i32("n").unwrap());
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(
                c.get_i32("n").unwrap() as usize,
                i,
                "chunks of {sha} are contiguous"
            );
            out.extend_from_slice(&c.get_binary_generic("data").unwrap()[..]);
        }
        assert_eq!(out.len() as i64, files.get_i64("length").unwrap());
        out
    }
}

//! Reading back: what `export` needs of stored messages.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;

use super::{Store, StoreError};

/// What `export` needs of one stored message.
#[derive(Debug, Clone)]
pub struct ExportItem {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub raw_sha256: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub text_blob: Option<String>,
    pub html_blob: Option<String>,
    /// (filename, content_type, sha256) of each attachment, in document order.
    pub attachments: Vec<(Option<String>, String, String)>,
}

impl ExportItem {
    fn from_document(d: &Document) -> Option<ExportItem> {
        let blob_of = |key: &str| {
            d.get_document(key)
                .ok()
                .and_then(|b| b.get_str("sha256").ok())
                .map(str::to_string)
        };
        let text_of = |key: &str| d.get_str(key).ok().map(str::to_string);
        Some(ExportItem {
            mailbox: d.get_str("mailbox").ok()?.to_string(),
            uidvalidity: d.get_i64("uidvalidity").ok()? as u32,
            uid: d.get_i64("uid").ok()? as u32,
            raw_sha256: blob_of("raw")?,
            text: text_of("text"),
            html: text_of("html"),
            text_blob: blob_of("text_blob"),
            html_blob: blob_of("html_blob"),
            attachments: d
                .get_array("attachments")
                .map(|list| {
                    list.iter()
                        .filter_map(|a| {
                            let a = a.as_document()?;
                            Some((
                                a.get_str("filename").ok().map(str::to_string),
                                a.get_str("content_type")
                                    .unwrap_or("application/octet-stream")
                                    .to_string(),
                                a.get_str("sha256").ok()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

impl Store {
    /// The stored messages of `account` (optionally one mailbox, optionally arrived on or
    /// after `since`), in (mailbox, uidvalidity, uid) order, without their headers.
    pub async fn export_items(
        &self,
        account: &str,
        mailbox: Option<&str>,
        since: Option<chrono::NaiveDate>,
    ) -> Result<Vec<ExportItem>, StoreError> {
        let mut filter = doc! {"account": account};
        if let Some(m) = mailbox {
            filter.insert("mailbox", m);
        }
        if let Some(day) = since {
            let start =
                bson::DateTime::from_chrono(day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
            // POP3 messages have no INTERNALDATE: their Date header decides
            filter.insert(
                "$or",
                vec![
                    doc! {"internal_date": {"$gte": start}},
                    doc! {"internal_date": Bson::Null, "date": {"$gte": start}},
                ],
            );
        }
        let coll = self.messages.clone();
        let projection = doc! {"headers": 0, "from": 0, "to": 0, "cc": 0, "bcc": 0, "sender": 0, "reply_to": 0, "references": 0};
        let docs: Vec<Document> = self
            .guarded("export query", async move {
                coll.find(filter)
                    .projection(projection)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let mut items: Vec<ExportItem> =
            docs.iter().filter_map(ExportItem::from_document).collect();
        items.sort_by(|a, b| {
            (&a.mailbox, a.uidvalidity, a.uid).cmp(&(&b.mailbox, b.uidvalidity, b.uid))
        });
        Ok(items)
    }
}

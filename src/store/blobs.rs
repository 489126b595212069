//! GridFS bucket `blobs`: content-addressed chunks and files documents, written and read back.

use bson::{doc, Document};

use super::{Store, StoreError};
use crate::parse::Blob;

/// GridFS' default chunk size, so that any GridFS reader can open our blobs.
pub const CHUNK_SIZE: usize = 255 * 1024;
/// Chunk documents are sent in groups of about this many bytes (bounds memory for big blobs).
const CHUNK_GROUP_BYTES: usize = 8 * 1024 * 1024;
/// At most this many documents per insert (or ids per lookup): a message of 60,000 tiny
/// attachments is written a thousand documents per operation, so that no single operation
/// outlasts `op_timeout` on a slow database (it did, and the retry did again: the mailbox was
/// stuck on that message).
pub(super) const GROUP_DOCS: usize = 1000;

impl Store {
    /// The bytes of a blob, chunk by chunk (each looked up by its exact `_id`).
    pub async fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let files = self.files.clone();
        let id = sha256.to_string();
        let file = self
            .guarded("blob read", async move {
                files.find_one(doc! {"_id": id}).await
            })
            .await?;
        let Some(file) = file else {
            return Err(StoreError::Missing(format!("blob {sha256}")));
        };
        let length = file.get_i64("length").unwrap_or(0).max(0) as usize;
        let chunk_size = file
            .get_i32("chunkSize")
            .unwrap_or(CHUNK_SIZE as i32)
            .max(1) as usize;
        let mut out = Vec::with_capacity(length);
        for n in 0..length.div_ceil(chunk_size) {
            let chunks = self.chunks.clone();
            let id = format!("{sha256}/{n}");
            let chunk = self
                .guarded("blob read", async move {
                    chunks.find_one(doc! {"_id": id}).await
                })
                .await?;
            let data = chunk
                .as_ref()
                .and_then(|c| c.get_binary_generic("data").ok())
                .ok_or_else(|| StoreError::Missing(format!("chunk {n} of blob {sha256}")))?;
            out.extend_from_slice(data);
        }
        if out.len() != length {
            return Err(StoreError::Missing(format!(
                "blob {sha256}: {} of {length} bytes",
                out.len()
            )));
        }
        Ok(out)
    }

    /// After a batch's documents are in: its blobs that became sweep candidates meanwhile are
    /// claimed, and any a sweep removed in between is written again (the second half of the
    /// claim protocol, `store::mirror`).
    pub(super) async fn reclaim_blobs(&self, blobs: &[&Blob]) -> Result<(), StoreError> {
        let shas: Vec<String> = blobs.iter().map(|b| b.sha256.clone()).collect();
        let claimed = self.claim_blobs(&shas).await?;
        let gone: Vec<&Blob> = blobs
            .iter()
            .copied()
            .filter(|b| claimed.get(&b.sha256) == Some(&false))
            .collect();
        if !gone.is_empty() {
            tracing::warn!(count = gone.len(), "blobs_rewritten_after_sweep");
            self.write_blobs(&gone).await?;
        }
        Ok(())
    }

    /// blob complete. Sweep candidates among them are claimed first (`Store::claim_blobs`);
    /// blobs present are skipped, the rest inserted, duplicates ignored.
    pub(super) async fn write_blobs(&self, blobs: &[&Blob]) -> Result<usize, StoreError> {
        let mut files_docs = Vec::new();
        let mut chunk_docs = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut written = 0;
        // Blobs a sweep may remove (the candidates among them) are claimed one by one; the
        // others are written as always: small ones inserted (duplicates ignored), large ones
        // looked up first.
        let shas: Vec<String> = blobs.iter().map(|b| b.sha256.clone()).collect();
        let claimed = self.claim_blobs(&shas).await?;
        for blob in blobs {
            let write = match claimed.get(&blob.sha256) {
                Some(present) => !present,
                None if blob.bytes.len() > CHUNK_SIZE => {
                    let files = self.files.clone();
                    let id = blob.sha256.clone();
                    let exists = self
                        .guarded("blob lookup", async move {
                            files.find_one(doc! {"_id": id}).await
                        })
                        .await?;
                    exists.is_none()
                }
                None => true,
            };
            if !write {
                continue;
            }
            written += 1;
            let chunks = if blob.bytes.is_empty() {
                Vec::new()
            } else {
                blob.bytes.chunks(CHUNK_SIZE).collect()
            };
            for (n, data) in chunks.into_iter().enumerate() {
                chunk_docs.push(doc! {
                    "_id": format!("{}/{n}", blob.sha256),
                    "files_id": &blob.sha256,
                    "n": n as i32,
                    "data": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: data.to_vec() },
                });
                chunk_bytes += data.len();
                // Bounded memory: a 50 MB message is written a few MiB at a time, not copied
                // into chunk documents all at once.
                if chunk_bytes >= CHUNK_GROUP_BYTES || chunk_docs.len() >= GROUP_DOCS {
                    self.flush_chunks(&mut chunk_docs, &mut chunk_bytes).await?;
                }
            }
            files_docs.push(doc! {
                "_id": &blob.sha256,
                "length": blob.bytes.len() as i64,
                "chunkSize": CHUNK_SIZE as i32,
                "uploadDate": bson::DateTime::now(),
                "touched_at": bson::DateTime::now(),
                "filename": &blob.sha256,
            });
            if files_docs.len() >= GROUP_DOCS {
                // a file document says its blob is complete: its chunks go first
                self.flush_chunks(&mut chunk_docs, &mut chunk_bytes).await?;
                self.insert_ignoring_duplicates(
                    &self.files,
                    std::mem::take(&mut files_docs),
                    "blob files",
                )
                .await?;
            }
        }
        self.flush_chunks(&mut chunk_docs, &mut chunk_bytes).await?;
        self.insert_ignoring_duplicates(&self.files, files_docs, "blob files")
            .await?;
        Ok(written)
    }

    /// Inserts the chunk documents gathered so far (duplicates ignored) and starts afresh.
    async fn flush_chunks(
        &self,
        docs: &mut Vec<Document>,
        bytes: &mut usize,
    ) -> Result<(), StoreError> {
        self.insert_ignoring_duplicates(&self.chunks, std::mem::take(docs), "blob chunks")
            .await?;
        *bytes = 0;
        Ok(())
    }
}

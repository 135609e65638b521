//! The Kafka records a batch's rows came from, kept for the dead-letter topic.
//!
//! A row the database refuses, or one whose id turns out to be stored with other content, is
//! dead-lettered with its source record byte for byte, so a batch keeps a copy of every row's
//! record until it is stored. Almost none is ever needed: [`SourceRecords`] keeps them all in one
//! buffer (three allocations per message before: topic, key and value) and makes a
//! [`SourceRecord`] only for the one that is dead-lettered. [`SourceRef`] is a record borrowed
//! from the message it was received as, from a [`SourceRecord`] or from a [`SourceRecords`].

use std::ops::Range;

use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Headers, Message};

use super::dlq::SourceRecord;

/// A record's headers, where they are.
#[derive(Clone, Copy)]
enum HeadersRef<'a> {
    None,
    Kafka(&'a BorrowedHeaders),
    Owned(&'a [(String, Option<Vec<u8>>)]),
    /// In a [`SourceRecords`]: names in `names`, values in `bytes`.
    Stored {
        names: &'a str,
        bytes: &'a [u8],
        headers: &'a [StoredHeader],
    },
}

impl<'a> HeadersRef<'a> {
    fn count(&self) -> usize {
        match self {
            HeadersRef::None => 0,
            HeadersRef::Kafka(headers) => headers.count(),
            HeadersRef::Owned(headers) => headers.len(),
            HeadersRef::Stored { headers, .. } => headers.len(),
        }
    }

    fn get(self, index: usize) -> Option<(&'a str, Option<&'a [u8]>)> {
        match self {
            HeadersRef::None => None,
            HeadersRef::Kafka(headers) => headers
                .try_get(index)
                .map(|header| (header.key, header.value)),
            HeadersRef::Owned(headers) => headers
                .get(index)
                .map(|(name, value)| (name.as_str(), value.as_deref())),
            HeadersRef::Stored {
                names,
                bytes,
                headers,
            } => headers.get(index).and_then(|header| {
                Some((
                    names.get(header.name.clone())?,
                    slice(bytes, &header.value)?,
                ))
            }),
        }
    }
}

impl std::fmt::Debug for HeadersRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} headers", self.count())
    }
}

/// A source record borrowed from the message it arrived as, from a [`SourceRecord`], or from a
/// [`SourceRecords`].
#[derive(Debug, Clone, Copy)]
pub struct SourceRef<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Message timestamp in milliseconds, if the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Key bytes.
    pub key: Option<&'a [u8]>,
    /// Value bytes.
    pub payload: Option<&'a [u8]>,
    headers: HeadersRef<'a>,
}

impl<'a> SourceRef<'a> {
    /// The record of a received message.
    pub fn from_message(message: &'a BorrowedMessage<'a>) -> Self {
        SourceRef {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key(),
            payload: message.payload(),
            headers: message
                .headers()
                .map_or(HeadersRef::None, HeadersRef::Kafka),
        }
    }

    /// A record without headers.
    pub fn headerless(
        topic: &'a str,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&'a [u8]>,
        payload: Option<&'a [u8]>,
    ) -> Self {
        SourceRef {
            topic,
            partition,
            offset,
            timestamp_ms,
            key,
            payload,
            headers: HeadersRef::None,
        }
    }

    /// Headers in their original order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let headers = self.headers;
        (0..headers.count()).filter_map(move |index| headers.get(index))
    }

    /// Bytes of the value (what the batch's size limit counts).
    pub fn payload_len(&self) -> usize {
        self.payload.map_or(0, <[u8]>::len)
    }

    /// The record, copied.
    pub fn to_record(&self) -> SourceRecord {
        SourceRecord {
            topic: self.topic.to_owned(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(<[u8]>::to_vec),
            payload: self.payload.map(<[u8]>::to_vec),
            headers: self
                .headers()
                .map(|(key, value)| (key.to_owned(), value.map(<[u8]>::to_vec)))
                .collect(),
        }
    }
}

impl<'a> From<&'a SourceRecord> for SourceRef<'a> {
    fn from(record: &'a SourceRecord) -> Self {
        SourceRef {
            topic: &record.topic,
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key: record.key.as_deref(),
            payload: record.payload.as_deref(),
            headers: HeadersRef::Owned(&record.headers),
        }
    }
}

/// Where one record's parts are in [`SourceRecords`].
#[derive(Debug, Clone)]
struct Entry {
    topic: usize,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    /// Into `SourceRecords::headers`.
    headers: Range<usize>,
}

/// Where one header's name and value are in [`SourceRecords`].
#[derive(Debug, Clone)]
struct StoredHeader {
    /// Into `SourceRecords::header_names`.
    name: Range<usize>,
    /// Into `SourceRecords::bytes`.
    value: Option<Range<usize>>,
}

/// Records in one buffer, in the order they were pushed.
#[derive(Debug, Default)]
pub struct SourceRecords {
    bytes: Vec<u8>,
    /// Distinct topics (a sink reads one).
    topics: Vec<String>,
    entries: Vec<Entry>,
    headers: Vec<StoredHeader>,
    header_names: String,
}

impl SourceRecords {
    /// An empty set with room for as many records and bytes as `other` holds.
    pub fn sized_like(other: &SourceRecords) -> Self {
        SourceRecords {
            bytes: Vec::with_capacity(other.bytes.len()),
            entries: Vec::with_capacity(other.entries.len()),
            ..SourceRecords::default()
        }
    }

    /// Appends a copy of `record`.
    pub fn push(&mut self, record: &SourceRef<'_>) {
        let topic = match self.topics.iter().position(|topic| topic == record.topic) {
            Some(index) => index,
            None => {
                self.topics.push(record.topic.to_owned());
                self.topics.len() - 1
            }
        };
        let key = record.key.map(|key| self.append(key));
        let payload = record.payload.map(|payload| self.append(payload));
        let first_header = self.headers.len();
        for (name, value) in record.headers() {
            let start = self.header_names.len();
            self.header_names.push_str(name);
            let value = value.map(|value| self.append(value));
            self.headers.push(StoredHeader {
                name: start..self.header_names.len(),
                value,
            });
        }
        self.entries.push(Entry {
            topic,
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key,
            payload,
            headers: first_header..self.headers.len(),
        });
    }

    fn append(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records the set has room for without growing.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Empties the set, keeping its buffers.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.topics.clear();
        self.entries.clear();
        self.headers.clear();
        self.header_names.clear();
    }

    /// The partition of every record, in order.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.entries.iter().map(|entry| entry.partition)
    }

    /// The index of the record at `partition` and `offset`.
    pub fn position(&self, partition: i32, offset: i64) -> Option<usize> {
        self.entries
            .iter()
            .position(|entry| entry.partition == partition && entry.offset == offset)
    }

    /// Record `index`, borrowed.
    pub fn get(&self, index: usize) -> Option<SourceRef<'_>> {
        let entry = self.entries.get(index)?;
        Some(SourceRef {
            topic: self.topics.get(entry.topic)?,
            partition: entry.partition,
            offset: entry.offset,
            timestamp_ms: entry.timestamp_ms,
            key: slice(&self.bytes, &entry.key)?,
            payload: slice(&self.bytes, &entry.payload)?,
            headers: HeadersRef::Stored {
                names: &self.header_names,
                bytes: &self.bytes,
                headers: self.headers.get(entry.headers.clone())?,
            },
        })
    }
}

/// The bytes at `range`, if there is one (`None` when the range is outside `bytes`).
fn slice<'b>(bytes: &'b [u8], range: &Option<Range<usize>>) -> Option<Option<&'b [u8]>> {
    match range {
        Some(range) => bytes.get(range.clone()).map(Some),
        None => Some(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        partition: i32,
        offset: i64,
        headers: Vec<(String, Option<Vec<u8>>)>,
    ) -> SourceRecord {
        SourceRecord {
            topic: format!("topic-{}", partition % 2),
            partition,
            offset,
            timestamp_ms: (offset % 3 != 0).then_some(1_700_000_000_000 + offset),
            key: (offset % 4 != 0).then(|| format!("key-{offset}").into_bytes()),
            payload: (offset % 5 != 0).then(|| vec![offset as u8; offset as usize % 17]),
            headers,
        }
    }

    #[test]
    fn records_come_back_byte_for_byte_whatever_they_hold() {
        let records: Vec<SourceRecord> = (0..40)
            .map(|offset| {
                let headers = (0..offset % 3)
                    .map(|index| {
                        let value = (index != 1).then(|| vec![index as u8; 3]);
                        (format!("h{index}"), value)
                    })
                    .collect();
                record((offset % 7) as i32, offset, headers)
            })
            .collect();
        let mut set = SourceRecords::default();
        for record in &records {
            set.push(&SourceRef::from(record));
        }
        assert_eq!(set.len(), records.len());
        for (index, record) in records.iter().enumerate() {
            let stored = set.get(index).expect("pushed");
            assert_eq!(&stored.to_record(), record, "record {index}");
            assert_eq!(stored.partition, record.partition);
            assert_eq!(set.position(record.partition, record.offset), Some(index));
            assert_eq!(&SourceRef::from(record).to_record(), record);
        }
        assert_eq!(set.get(records.len()).map(|stored| stored.offset), None);
        assert!(set
            .partitions()
            .eq(records.iter().map(|record| record.partition)));
        let capacity = set.capacity();
        set.clear();
        assert!(set.is_empty() && set.capacity() == capacity);
        assert_eq!(set.position(0, 0), None);
    }
}

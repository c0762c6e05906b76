//! The NAB-format corpus: `<category>/<file>.csv` (`timestamp,value`) and
//! `windows.json` (`{"<category>/<file>.csv": [[start, end], ...]}`), windows given as
//! timestamps equal to rows of their file.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// A loading problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `windows.json` is not what NAB writes.
    #[error("{path}: invalid windows file: {message}")]
    Windows {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A CSV row could not be parsed.
    #[error("{file}:{line}: {message}")]
    Csv {
        /// The file, relative to the corpus.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A window end is not a row of its file.
    #[error("{file}: window timestamp {timestamp} is not a row of the file")]
    UnknownTimestamp {
        /// The file, relative to the corpus.
        file: String,
        /// The timestamp.
        timestamp: String,
    },
}

/// One labeled file.
#[derive(Debug, Clone, PartialEq)]
pub struct NabFile {
    /// Path relative to the corpus (`realKnownCause/nyc_taxi.csv`).
    pub name: String,
    /// Timestamps as in the file (`YYYY-MM-DD HH:MM:SS`).
    pub timestamps: Vec<String>,
    /// The same timestamps in unix seconds (UTC), sent as the samples' time.
    pub times: Vec<i64>,
    /// The values, one per row.
    pub values: Vec<f64>,
    /// Anomaly windows as inclusive row ranges, in time order.
    pub windows: Vec<(usize, usize)>,
}

/// The second-resolution part of a NAB timestamp (`.ffffff` dropped).
fn seconds_part(ts: &str) -> &str {
    let ts = ts.trim();
    ts.get(..19).unwrap_or(ts)
}

/// Loads every file named in `dir/windows.json`, sorted by name.
pub fn load(dir: &Path) -> Result<Vec<NabFile>, NabError> {
    let windows_path = dir.join("windows.json");
    let text = std::fs::read_to_string(&windows_path).map_err(|source| NabError::Read {
        path: windows_path.clone(),
        source,
    })?;
    let labels: BTreeMap<String, Vec<[String; 2]>> =
        serde_json::from_str(&text).map_err(|e| NabError::Windows {
            path: windows_path.clone(),
            message: e.to_string(),
        })?;
    if labels.is_empty() {
        return Err(NabError::Windows {
            path: windows_path,
            message: "no file is listed".into(),
        });
    }
    let mut files = Vec::with_capacity(labels.len());
    for (name, windows) in labels {
        let path = dir.join(&name);
        let text = std::fs::read_to_string(&path).map_err(|source| NabError::Read {
            path: path.clone(),
            source,
        })?;
        let mut file = parse_csv(&name, &text)?;
        let index: BTreeMap<&str, usize> = file
            .timestamps
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let row = |ts: &str| {
            index
                .get(seconds_part(ts))
                .copied()
                .ok_or_else(|| NabError::UnknownTimestamp {
                    file: name.clone(),
                    timestamp: ts.to_owned(),
                })
        };
        let mut rows = Vec::with_capacity(windows.len());
        for [start, end] in &windows {
            rows.push((row(start)?, row(end)?));
        }
        rows.sort_unstable();
        file.windows = rows;
        files.push(file);
    }
    Ok(files)
}

/// Parses `timestamp,value` rows (with a header line).
pub fn parse_csv(name: &str, text: &str) -> Result<NabFile, NabError> {
    let mut file = NabFile {
        name: name.to_owned(),
        timestamps: Vec::new(),
        times: Vec::new(),
        values: Vec::new(),
        windows: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if i == 0 || line.is_empty() {
            continue;
        }
        let fail = |message: String| NabError::Csv {
            file: name.to_owned(),
            line: i + 1,
            message,
        };
        let (ts, value) = line
            .split_once(',')
            .ok_or_else(|| fail("expected timestamp,value".into()))?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|e| fail(format!("value {value:?}: {e}")))?;
        if !value.is_finite() {
            return Err(fail(format!("value {value} is not finite")));
        }
        let seconds = unix_seconds(seconds_part(ts))
            .ok_or_else(|| fail(format!("timestamp {ts:?} is not YYYY-MM-DD HH:MM:SS")))?;
        file.timestamps.push(seconds_part(ts).to_owned());
        file.times.push(seconds);
        file.values.push(value);
    }
    Ok(file)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) in unix seconds.
pub fn unix_seconds(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_convert_to_unix_seconds() {
        assert_eq!(unix_seconds("1970-01-01 00:00:00"), Some(0));
        assert_eq!(unix_seconds("2014-07-01 00:30:00"), Some(1_404_174_600));
        assert_eq!(unix_seconds("2000-03-01 00:00:00"), Some(951_868_800));
        assert_eq!(unix_seconds("2014-13-01 00:00:00"), None);
        assert_eq!(unix_seconds("2014-07-01"), None);
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn windows_map_to_rows() {
        let dir = std::env::temp_dir().join(format!("tidewatch-nab-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("cat")).unwrap();
        std::fs::write(
            dir.join("cat/a.csv"),
            "timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,2.5\n2014-01-01 00:10:00,3\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("windows.json"),
            r#"{"cat/a.csv": [["2014-01-01 00:05:00.000000", "2014-01-01 00:10:00.000000"]]}"#,
        )
        .unwrap();
        let files = load(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].values, [1.0, 2.5, 3.0]);
        assert_eq!(files[0].windows, [(1, 2)]);
        std::fs::write(
            dir.join("windows.json"),
            r#"{"cat/a.csv": [["2015-01-01 00:05:00.000000", "2014-01-01 00:10:00.000000"]]}"#,
        )
        .unwrap();
        assert!(matches!(load(&dir), Err(NabError::UnknownTimestamp { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(load(&dir), Err(NabError::Read { .. })));
    }
}

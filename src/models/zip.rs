//! One file out of a wheel (a zip archive): found by name in the central directory, read
//! through its local header, inflated when deflated, its CRC-32 and size checked.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a zip archive (no end of central directory record)")]
    NotZip,
    #[error("the zip archive is damaged: {0}")]
    Damaged(&'static str),
    #[error("{name} is not in the archive")]
    Missing { name: String },
    #[error("{name} is compressed with method {method}; only stored (0) and deflate (8) are read")]
    Method { name: String, method: u16 },
    #[error("{name} in the archive: CRC-32 {got:08x}, the directory says {want:08x}")]
    Crc { name: String, got: u32, want: u32 },
    #[error("{name} in the archive: {got} bytes, the directory says {want}")]
    Size { name: String, got: u64, want: u64 },
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ZipError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ZipError::Damaged("a record is cut short"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ZipError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ZipError::Damaged("a record is cut short"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ZipError> {
    let lo = u32_at(b, at)? as u64;
    let hi = u32_at(b, at + 4)? as u64;
    Ok(lo | hi << 32)
}

/// Where an entry's data is and what it should give.
struct Entry {
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    local_header: u64,
}

/// Finds `name` in the central directory of `f`.
fn find(f: &mut File, name: &str) -> Result<Entry, ZipError> {
    let len = f.metadata()?.len();
    // The end record is 22 bytes plus a comment of up to 65535.
    let tail_len = len.min(22 + 65535);
    f.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact(&mut tail)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or(ZipError::NotZip)?;
    let mut entries = u16_at(&tail, eocd + 10)? as u64;
    let mut cd_size = u32_at(&tail, eocd + 12)? as u64;
    let mut cd_offset = u32_at(&tail, eocd + 16)? as u64;
    if cd_offset == 0xffff_ffff || entries == 0xffff {
        // Zip64: the locator sits right before the end record.
        let loc = eocd
            .checked_sub(20)
            .ok_or(ZipError::Damaged("zip64 locator missing"))?;
        if tail[loc..loc + 4] != [0x50, 0x4b, 0x06, 0x07] {
            return Err(ZipError::Damaged("zip64 locator missing"));
        }
        let rec = u64_at(&tail, loc + 8)?;
        let mut r = [0u8; 56];
        f.seek(SeekFrom::Start(rec))?;
        f.read_exact(&mut r)?;
        if r[..4] != [0x50, 0x4b, 0x06, 0x06] {
            return Err(ZipError::Damaged("zip64 end record missing"));
        }
        entries = u64_at(&r, 32)?;
        cd_size = u64_at(&r, 40)?;
        cd_offset = u64_at(&r, 48)?;
    }
    if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) || cd_size > 64 << 20 {
        return Err(ZipError::Damaged(
            "the central directory lies outside the file",
        ));
    }
    f.seek(SeekFrom::Start(cd_offset))?;
    let mut cd = vec![0u8; cd_size as usize];
    f.read_exact(&mut cd)?;
    let mut at = 0usize;
    for _ in 0..entries {
        if u32_at(&cd, at)? != 0x0201_4b50 {
            return Err(ZipError::Damaged(
                "a central directory entry has a bad signature",
            ));
        }
        let method = u16_at(&cd, at + 10)?;
        let crc = u32_at(&cd, at + 16)?;
        let mut compressed = u32_at(&cd, at + 20)? as u64;
        let mut size = u32_at(&cd, at + 24)? as u64;
        let name_len = u16_at(&cd, at + 28)? as usize;
        let extra_len = u16_at(&cd, at + 30)? as usize;
        let comment_len = u16_at(&cd, at + 32)? as usize;
        let mut local_header = u32_at(&cd, at + 42)? as u64;
        let entry_name = cd
            .get(at + 46..at + 46 + name_len)
            .ok_or(ZipError::Damaged("a name runs past the directory"))?;
        if entry_name == name.as_bytes() {
            // Zip64 extra field: the 64-bit values for those marked 0xffffffff, in order.
            let extra = cd
                .get(at + 46 + name_len..at + 46 + name_len + extra_len)
                .ok_or(ZipError::Damaged("an extra field runs past the directory"))?;
            let mut e = 0;
            while e + 4 <= extra.len() {
                let id = u16_at(extra, e)?;
                let n = u16_at(extra, e + 2)? as usize;
                if id == 1 {
                    let mut k = e + 4;
                    for v in [&mut size, &mut compressed, &mut local_header] {
                        if *v == 0xffff_ffff {
                            *v = u64_at(extra, k)?;
                            k += 8;
                        }
                    }
                }
                e += 4 + n;
            }
            return Ok(Entry {
                method,
                crc,
                compressed,
                size,
                local_header,
            });
        }
        at += 46 + name_len + extra_len + comment_len;
    }
    Err(ZipError::Missing {
        name: name.to_string(),
    })
}

/// Writes the file `name` of the zip archive at `archive` to `out`; `progress` is called with
/// the bytes written so far. Returns the size.
pub fn extract(
    archive: &Path,
    name: &str,
    out: &mut impl Write,
    mut progress: impl FnMut(u64),
) -> Result<u64, ZipError> {
    let mut f = File::open(archive)?;
    let e = find(&mut f, name)?;
    let mut local = [0u8; 30];
    f.seek(SeekFrom::Start(e.local_header))?;
    f.read_exact(&mut local)?;
    if u32_at(&local, 0)? != 0x0403_4b50 {
        return Err(ZipError::Damaged("a local header has a bad signature"));
    }
    let skip = u16_at(&local, 26)? as i64 + u16_at(&local, 28)? as i64;
    f.seek(SeekFrom::Current(skip))?;
    let data = f.take(e.compressed);
    let mut reader: Box<dyn Read> = match e.method {
        0 => Box::new(data),
        8 => Box::new(flate2::read::DeflateDecoder::new(
            std::io::BufReader::with_capacity(1 << 20, data),
        )),
        method => {
            return Err(ZipError::Method {
                name: name.to_string(),
                method,
            })
        }
    };
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > e.size {
            break;
        }
        crc.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        progress(written);
    }
    if written != e.size {
        return Err(ZipError::Size {
            name: name.to_string(),
            got: written,
            want: e.size,
        });
    }
    let got = crc.finalize();
    if got != e.crc {
        return Err(ZipError::Crc {
            name: name.to_string(),
            got,
            want: e.crc,
        });
    }
    Ok(written)
}

/// A zip archive, written for tests: each file stored (method 0) or deflated (8).
pub fn write_archive(files: &[(&str, &[u8], bool)]) -> Vec<u8> {
    use flate2::write::DeflateEncoder;
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data, deflate) in files {
        let body = if *deflate {
            let mut enc = DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = enc.write_all(data);
            enc.finish().unwrap_or_default()
        } else {
            data.to_vec()
        };
        let method: u16 = if *deflate { 8 } else { 0 };
        let crc = crc32fast::hash(data);
        let offset = out.len() as u32;
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&method.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes()); // time, date
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&body);
        cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        cd.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut cd);
        cd.extend_from_slice(&[0u8; 6]); // comment length, disk, internal attributes
        cd.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        cd.extend_from_slice(&offset.to_le_bytes());
        cd.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(files.len() as u16).to_le_bytes());
    out.extend_from_slice(&(files.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("edgellm-zip-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn stored_and_deflated_entries_come_out_whole() {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let zip = write_archive(&[
            ("a/stored.bin", b"hello", false),
            ("a/big.gguf", &big, true),
            ("a/last.txt", b"end", false),
        ]);
        let p = tmp("ok.whl", &zip);
        let mut out = Vec::new();
        assert_eq!(
            extract(&p, "a/big.gguf", &mut out, |_| {}).unwrap(),
            big.len() as u64
        );
        assert_eq!(out, big);
        out.clear();
        extract(&p, "a/stored.bin", &mut out, |_| {}).unwrap();
        assert_eq!(out, b"hello");
        out.clear();
        extract(&p, "a/last.txt", &mut out, |_| {}).unwrap();
        assert_eq!(out, b"end");
        // Python's zipfile reads what this writes (as it reads wheels).
        let py = std::process::Command::new("python3")
            .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.testzip() is None or sys.exit(1); print(len(z.read('a/big.gguf')))"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&py.stdout).trim(),
            big.len().to_string(),
            "{py:?}"
        );
        let e = extract(&p, "a/none", &mut out, |_| {}).unwrap_err();
        assert!(matches!(e, ZipError::Missing { .. }), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn damage_is_found() {
        let data = b"some model bytes, some model bytes";
        let mut zip = write_archive(&[("m.gguf", data, false)]);
        // A flipped byte in the data: the CRC says so.
        let at = 30 + "m.gguf".len() + 3;
        zip[at] ^= 0x55;
        let p = tmp("crc.whl", &zip);
        let e = extract(&p, "m.gguf", &mut Vec::new(), |_| {}).unwrap_err();
        assert!(matches!(e, ZipError::Crc { .. }), "{e}");
        // Cut short: no end record.
        let p2 = tmp("short.whl", &zip[..zip.len() - 10]);
        let e = extract(&p2, "m.gguf", &mut Vec::new(), |_| {}).unwrap_err();
        assert!(matches!(e, ZipError::NotZip), "{e}");
        // Not a zip at all, and an empty file.
        for bytes in [&b"GGUF"[..], &b""[..]] {
            let p3 = tmp("none.whl", bytes);
            assert!(extract(&p3, "m.gguf", &mut Vec::new(), |_| {}).is_err());
            std::fs::remove_file(p3).unwrap();
        }
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(p2).unwrap();
    }
}

//! Little-endian reads over a byte slice that fail, instead of panicking, past its end.

type Res<T> = std::result::Result<T, String>;

pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    pub fn position(&self) -> u64 {
        self.at as u64
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// `Err` unless `count` items of at least `min_bytes` each could fit in what remains.
    pub fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Res<()> {
        match count.checked_mul(min_bytes) {
            Some(need) if need <= self.remaining() as u64 => Ok(()),
            _ => Err(format!(
                "{count} {what} cannot fit in the {} bytes left at offset {}",
                self.remaining(),
                self.at
            )),
        }
    }

    pub fn bytes(&mut self, n: usize) -> Res<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "{n} bytes wanted at offset {}, the file ends {} bytes later",
                self.at,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Res<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A GGUF string: a u64 byte length, then UTF-8 bytes.
    pub fn string(&mut self) -> Res<String> {
        let len = self.u64()?;
        self.check_count(len, 1, "string bytes")?;
        let at = self.at;
        let raw = self.bytes(len as usize)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("string at offset {at} is not UTF-8"))
    }
}

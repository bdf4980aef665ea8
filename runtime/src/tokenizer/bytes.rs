//! The GPT-2 byte-level alphabet: every byte 0..=255 is written as one printable unicode
//! character in byte-level BPE vocabularies ("Ġ" is the space byte 0x20, "Ċ" is b'\n').
//! The printable bytes `!`..=`~`, `¡`..=`¬` and `®`..=`ÿ` stand for themselves; the other
//! 68 bytes are numbered, in byte order, from U+0100 upwards.

/// The character that stands for byte `b`.
pub fn byte_to_char(b: u8) -> char {
    tables().0[b as usize]
}

/// The byte a byte-level character stands for, if it is one of the 256.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp >= 0x144 {
        return None;
    }
    tables().1[cp as usize]
}

/// The raw bytes of a byte-level token string; a character outside the alphabet (which a
/// well-formed vocabulary never has) is kept as its own UTF-8.
pub fn decode_byte_level(token: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

fn self_mapped(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

struct Tables([char; 256], [Option<u8>; 0x144]);

fn build() -> Tables {
    let mut fwd = ['\0'; 256];
    let mut inv = [None; 0x144];
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let cp = if self_mapped(b) {
            b as u32
        } else {
            let cp = next;
            next += 1;
            cp
        };
        // Every code point here is below U+0144, so it is a valid char.
        let c = char::from_u32(cp).unwrap_or('\u{FFFD}');
        fwd[b as usize] = c;
        inv[cp as usize] = Some(b);
    }
    Tables(fwd, inv)
}

fn tables() -> &'static Tables {
    static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bytes() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(char_to_byte('Ġ'), Some(b' '));
        assert_eq!(char_to_byte('\u{143}'), Some(0xAD));
        assert_eq!(char_to_byte('€'), None);
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(decode_byte_level("ĠHelloĊ"), b" Hello\n");
    }
}

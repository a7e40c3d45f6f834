//! A fixed-length set of piece indices, as exchanged in [`PeerMsg::Bitfield`].
//!
//! Why this layout: it is BitTorrent's (bit `i` is bit `7 - i % 8` of byte `i / 8`,
//! most significant bit first), which is compact on the wire (one bit per piece) and
//! familiar to anyone reading a packet dump. The length travels with the bytes so a
//! decoder never has to guess how many trailing bits are padding.
//!
//! Serde derives accept *any* `len` and byte vector, because a decoder cannot know the
//! piece count. A bitfield that came off the wire is untrusted until
//! [`Bitfield::validate`] has checked it against the manifest's piece count: only then
//! do the indexing methods' preconditions hold. [`crate::Swarm`] does this itself for
//! every bitfield a peer sends.
//!
//! [`PeerMsg::Bitfield`]: crate::PeerMsg::Bitfield

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::PieceIndex;

/// One bit per piece, MSB-first within each byte.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bitfield {
    len: u32,
    bytes: Vec<u8>,
}

/// Why an untrusted [`Bitfield`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitfieldError {
    /// The bitfield covers a different number of pieces than the content has.
    WrongLength { expected: u32, got: u32 },
    /// The byte vector is not exactly `ceil(len / 8)` bytes long.
    WrongByteCount { expected: usize, got: usize },
    /// A padding bit past `len` in the last byte is set.
    SpareBitsSet,
}

impl fmt::Display for BitfieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitfieldError::WrongLength { expected, got } => {
                write!(f, "bitfield covers {got} pieces, content has {expected}")
            }
            BitfieldError::WrongByteCount { expected, got } => {
                write!(f, "bitfield has {got} bytes, expected {expected}")
            }
            BitfieldError::SpareBitsSet => write!(f, "bitfield has padding bits set"),
        }
    }
}

impl std::error::Error for BitfieldError {}

fn byte_len(len: u32) -> usize {
    (len as usize).div_ceil(8)
}

impl Bitfield {
    /// All `len` bits clear.
    pub fn new(len: u32) -> Bitfield {
        Bitfield {
            len,
            bytes: vec![0; byte_len(len)],
        }
    }

    /// All `len` bits set (padding bits stay clear).
    pub fn full(len: u32) -> Bitfield {
        let mut b = Bitfield {
            len,
            bytes: vec![0xff; byte_len(len)],
        };
        let spare = (b.bytes.len() * 8) as u32 - len;
        if let Some(last) = b.bytes.last_mut() {
            *last &= 0xffu8 << spare;
        }
        b
    }

    /// Number of pieces covered.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True if the bitfield covers no piece at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set. Out-of-range indices read as clear, so a caller can
    /// never be made to panic by an index it did not check.
    pub fn get(&self, i: PieceIndex) -> bool {
        if i >= self.len {
            return false;
        }
        self.bytes
            .get(i as usize / 8)
            .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
    }

    /// Sets bit `i`.
    ///
    /// # Panics
    /// If `i >= len()`: callers check indices from the network before touching state.
    pub fn set(&mut self, i: PieceIndex) {
        assert!(
            i < self.len,
            "bit {i} out of range for bitfield of {}",
            self.len
        );
        self.bytes[i as usize / 8] |= 0x80 >> (i % 8);
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    /// True if every one of the `len` bits is set (vacuously true when `len == 0`).
    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Indices of the set bits, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = PieceIndex> + '_ {
        self.bytes.iter().enumerate().flat_map(move |(byte_i, &b)| {
            (0..8u32)
                .filter(move |bit| b & (0x80 >> bit) != 0)
                .map(move |bit| byte_i as u32 * 8 + bit)
                .filter(move |&i| i < self.len)
        })
    }

    /// Checks a bitfield decoded from untrusted input against the piece count the
    /// content really has: right `len`, exactly `ceil(len / 8)` bytes, padding clear.
    pub fn validate(&self, expected_len: u32) -> Result<(), BitfieldError> {
        if self.len != expected_len {
            return Err(BitfieldError::WrongLength {
                expected: expected_len,
                got: self.len,
            });
        }
        let want = byte_len(self.len);
        if self.bytes.len() != want {
            return Err(BitfieldError::WrongByteCount {
                expected: want,
                got: self.bytes.len(),
            });
        }
        let spare = (want * 8) as u32 - self.len;
        if let Some(&last) = self.bytes.last() {
            if spare > 0 && last & ((1u8 << spare) - 1) != 0 {
                return Err(BitfieldError::SpareBitsSet);
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitfield({}/{} ", self.count_ones(), self.len)?;
        for i in 0..self.len.min(64) {
            f.write_str(if self.get(i) { "1" } else { "0" })?;
        }
        if self.len > 64 {
            f.write_str("…")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_full_and_counts() {
        for len in [0u32, 1, 7, 8, 9, 15, 16, 17, 100] {
            let e = Bitfield::new(len);
            assert_eq!(e.len(), len);
            assert_eq!(e.count_ones(), 0);
            assert_eq!(e.is_full(), len == 0);
            assert_eq!(e.validate(len), Ok(()));
            let f = Bitfield::full(len);
            assert_eq!(f.count_ones(), len);
            assert!(f.is_full());
            assert_eq!(
                f.validate(len),
                Ok(()),
                "full({len}) must keep padding clear"
            );
            assert_eq!(
                f.iter_ones().collect::<Vec<_>>(),
                (0..len).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn msb_first_layout() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        assert_eq!(b.bytes, vec![0x80, 0x40]);
        assert!(b.get(0) && b.get(9) && !b.get(1) && !b.get(8));
        assert!(
            !b.get(10) && !b.get(u32::MAX),
            "out of range reads as clear"
        );
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 9]);
        b.set(9);
        assert_eq!(b.count_ones(), 2, "set is idempotent");
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn set_out_of_range_panics() {
        Bitfield::new(3).set(3);
    }

    #[test]
    fn validate_rejects_malformed() {
        let ok = Bitfield::new(10);
        assert_eq!(
            ok.validate(11),
            Err(BitfieldError::WrongLength {
                expected: 11,
                got: 10
            })
        );

        let short = Bitfield {
            len: 10,
            bytes: vec![0],
        };
        assert_eq!(
            short.validate(10),
            Err(BitfieldError::WrongByteCount {
                expected: 2,
                got: 1
            })
        );
        let long = Bitfield {
            len: 10,
            bytes: vec![0, 0, 0],
        };
        assert_eq!(
            long.validate(10),
            Err(BitfieldError::WrongByteCount {
                expected: 2,
                got: 3
            })
        );
        let huge_len = Bitfield {
            len: u32::MAX,
            bytes: vec![],
        };
        assert!(huge_len.validate(u32::MAX).is_err());

        let spare = Bitfield {
            len: 10,
            bytes: vec![0, 0x20],
        };
        assert_eq!(spare.validate(10), Err(BitfieldError::SpareBitsSet));
        let last_real = Bitfield {
            len: 10,
            bytes: vec![0, 0x40],
        };
        assert_eq!(last_real.validate(10), Ok(()));
    }

    #[test]
    fn serde_roundtrip_keeps_len_and_bytes() {
        // No serde format crate is a dependency here; the derive is exercised by the
        // runtime's frame tests. Check the structural equality it relies on instead.
        let mut b = Bitfield::new(13);
        b.set(12);
        let c = b.clone();
        assert_eq!(b, c);
        assert_eq!(format!("{b:?}"), "Bitfield(1/13 0000000000001)");
    }

    #[test]
    fn error_display() {
        let e = BitfieldError::WrongLength {
            expected: 3,
            got: 4,
        };
        assert_eq!(e.to_string(), "bitfield covers 4 pieces, content has 3");
        let _: &dyn std::error::Error = &e;
    }
}

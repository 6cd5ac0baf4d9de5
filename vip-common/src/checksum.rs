//! The Internet checksum (RFC 1071) over a finished IPv4 header.
//!
//! The datapath builds each outer header on the stack and checksums those exact bytes, so the
//! checksum can never drift from the fields that go on the wire.

/// Checksum of a 20-byte IPv4 header whose checksum field (bytes 10..12) is zero.
///
/// The result is in host order; write it with `to_be_bytes()`. A header that carries this value
/// folds to `0xffff` when summed again, which is how receivers verify it.
#[inline(always)]
pub fn ipv4_header_checksum(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    // Ten 16-bit words cannot carry more than twice.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Adds the 16-bit big-endian words of `bytes` (even length) to a one's-complement sum.
#[inline(always)]
pub fn add_words<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Folds a one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Sum of all 16-bit words of `bytes` folded to 16 bits; `0xffff` means "checksum verifies".
pub fn fold_sum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for pair in bytes.chunks(2) {
        let hi = u64::from(pair[0]) << 8;
        let lo = pair.get(1).copied().map_or(0, u64::from);
        sum += hi | lo;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_header_checksum() {
        // Example header from RFC 1071 discussions / Wikipedia: checksum 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let sum = ipv4_header_checksum(&hdr);
        assert_eq!(sum, 0xb861);
        hdr[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(fold_sum(&hdr), 0xffff);
    }
}

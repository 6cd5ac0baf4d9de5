//! The Internet checksum (RFC 1071), and the IPv4 outer header that carries one.
//!
//! The datapath's IPv4 outer header is built and checksummed from the same words it stores, so
//! the checksum can never drift from the fields that go on the wire.

/// TTL / hop limit of every outer header the datapath builds.
pub const OUTER_TTL: u8 = 64;

/// A 20-byte IPv4 header without options, fragment bits or identification (an outer header of
/// the datapath), with its checksum, as five 32-bit words in wire order: the caller stores them
/// as they are. Built in registers, one's-complement-summed in native byte order (RFC 1071
/// section 2(B): the sum is byte-order independent), so the datapath neither assembles the
/// header byte by byte nor sums it twice.
#[inline(always)]
pub fn ipv4_header(tos: u8, total_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) -> [u32; 5] {
    let first = ipv4_first_word(tos, total_len);
    let ttl_proto = u32::from_ne_bytes([OUTER_TTL, proto, 0, 0]);
    let (src, dst) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
    let checksum = ipv4_checksum(first, ipv4_rest_sum(ttl_proto, src, dst));
    let ttl_proto_checksum = u32::from_ne_bytes([OUTER_TTL, proto, checksum[0], checksum[1]]);
    [first, 0, ttl_proto_checksum, src, dst]
}

/// The first word of an outer IPv4 header (no options): version and header length, TOS,
/// total length; the only word that changes from one packet of a flow to the next.
#[inline(always)]
pub fn ipv4_first_word(tos: u8, total_len: u16) -> u32 {
    let len = total_len.to_be_bytes();
    u32::from_ne_bytes([0x45, tos, len[0], len[1]])
}

/// The sum of an outer IPv4 header's words that stay the same for a flow: TTL and protocol
/// (`ttl_proto`, its checksum bytes zero), the addresses; the identification word is zero.
#[inline(always)]
pub fn ipv4_rest_sum(ttl_proto: u32, src: u32, dst: u32) -> u64 {
    u64::from(ttl_proto) + u64::from(src) + u64::from(dst)
}

/// The checksum of an IPv4 header whose first word is `first` and whose other words sum to
/// `rest` ([`ipv4_rest_sum`]), as its wire bytes.
#[inline(always)]
pub fn ipv4_checksum(first: u32, rest: u64) -> [u8; 2] {
    let mut sum = u64::from(first) + rest;
    // Four 32-bit words: three folds bring the sum to 16 bits.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    // Summed in native order, the checksum's native bytes are its wire bytes.
    (!(sum as u16)).to_ne_bytes()
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

    fn bytes(words: [u32; 5]) -> [u8; 20] {
        let mut out = [0; 20];
        for (chunk, word) in out.chunks_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    #[test]
    fn outer_ipv4_header_fields_and_checksum() {
        let hdr = bytes(ipv4_header(
            0xb8,
            0x0573,
            4,
            [198, 18, 0, 1],
            [198, 18, 1, 7],
        ));
        assert_eq!(
            hdr,
            [
                0x45, 0xb8, 0x05, 0x73, 0, 0, 0, 0, 64, 4, hdr[10], hdr[11], 198, 18, 0, 1, 198,
                18, 1, 7
            ]
        );
        assert_eq!(fold_sum(&hdr), 0xffff, "checksum verifies");
    }

    #[test]
    fn checksum_folds_every_carry() {
        // All-ones addresses and the largest length make the sum carry more than once.
        for (tos, len) in [(0xff, 0xffff), (0, 20), (0x10, 0x1234)] {
            let hdr = bytes(ipv4_header(tos, len, 0xff, [0xff; 4], [0xff; 4]));
            assert_eq!(fold_sum(&hdr), 0xffff, "tos {tos:#x} len {len:#x}");
        }
    }
}

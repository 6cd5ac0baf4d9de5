use vip_common::IPPROTO_TCP;
use vip_tests::{fixture::*, packet::*};

#[test]
fn smoke() {
    let mut lb = Lb::new();
    lb.backend(0, "198.18.1.1");
    lb.vip(&VipSpec::new("198.18.100.1", IPPROTO_TCP, 80, &[0]));
    let f = Frame::tcp("198.18.50.1", 40000, "198.18.100.1", 80, TCP_SYN).build();
    let (action, out) = lb.run(&f);
    println!("{action} {:02x?}", out);
    assert_eq!(action, XDP_TX);
}

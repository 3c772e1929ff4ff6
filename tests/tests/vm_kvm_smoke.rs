//! VM test: the smallest possible KVM guest runs on this machine's `/dev/kvm` (directly, or
//! inside the VM test host) and its port writes and `hlt` come back as exits.
#![cfg(target_arch = "x86_64")]

use squib_tests::guest::{GuestExit, RealModeGuest};

#[test]
fn test_real_mode_guest_writes_computed_byte_to_com1_and_halts() {
    let code = [
        0xb0, 0x02, // mov al, 2
        0x04, 0x03, // add al, 3
        0x04, b'0', // add al, '0'    -> '5', computed by the guest
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0xb0, b'\n', // mov al, '\n'
        0xee,  // out dx, al
        0xf4,  // hlt
    ];
    let mut guest = RealModeGuest::new(&code).unwrap();
    let exits = guest.run_until_halt(8).unwrap();
    assert_eq!(
        exits,
        [
            GuestExit::IoOut {
                port: 0x3f8,
                data: vec![b'5']
            },
            GuestExit::IoOut {
                port: 0x3f8,
                data: vec![b'\n']
            },
            GuestExit::Hlt,
        ]
    );
}

#[test]
fn test_real_mode_guest_reports_too_many_exits_when_it_never_halts() {
    let code = [
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x', // mov al, 'x'
        0xee, // 1: out dx, al
        0xeb, 0xfd, // jmp 1b
    ];
    let mut guest = RealModeGuest::new(&code).unwrap();
    let err = guest.run_until_halt(5).unwrap_err();
    assert!(
        matches!(
            err,
            squib_tests::guest::GuestError::TooManyExits { limit: 5 }
        ),
        "{err}"
    );
}

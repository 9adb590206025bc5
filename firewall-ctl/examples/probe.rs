use aya::{
    TestRunOptions,
    maps::{Array, HashMap},
    programs::{TestRun, Xdp},
};
use firewall_common::*;
fn pkt(src: [u8; 4]) -> Vec<u8> {
    let mut p = vec![
        2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0, 0x45, 0, 0, 50, 0, 0, 0x40, 0, 64, 17, 0, 0,
    ];
    p.extend(src);
    p.extend([198, 18, 0, 2]);
    p.extend([0x30, 0x39, 0x00, 0x35, 0, 30, 0, 0]);
    p.resize(64, 0);
    p
}
fn bench(p: &Xdp, pkt: &[u8]) -> f64 {
    let mut out = vec![0u8; 256];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                repeat: 1_000_000,
                ..Default::default()
            })
            .unwrap();
        best = best.min(r.duration.as_nanos() as f64);
    }
    best
}
fn main() {
    let mut ebpf = aya::EbpfLoader::new().load(firewall_ctl::EBPF_OBJ).unwrap();
    {
        let mut ctrl: Array<_, Control> = ebpf.map_mut("CTRL").unwrap().try_into().unwrap();
        ctrl.set(
            0,
            Control {
                committed_gen: 5,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    }
    {
        let mut m: HashMap<_, PeerV4Key, PeerVal> =
            ebpf.map_mut("PEERS_V4").unwrap().try_into().unwrap();
        for i in 0..1000u32 {
            let b = i.to_be_bytes();
            m.insert(
                PeerV4Key {
                    addr: [198, 19, b[2], b[3]],
                },
                PeerVal {
                    added_gen: 1,
                    removed_gen: GEN_NEVER,
                    hits: 0,
                    origin: 1,
                    _pad: 0,
                },
                0,
            )
            .unwrap();
        }
    }
    for name in ["firewall", "pass_floor", "exp_hash_only"] {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    let f: &Xdp = ebpf.program("pass_floor").unwrap().try_into().unwrap();
    let fw: &Xdp = ebpf.program("firewall").unwrap().try_into().unwrap();
    for round in 0..3 {
        let floor = bench(f, &pkt([198, 19, 0, 7]));
        let hit = bench(fw, &pkt([198, 19, 0, 7]));
        let miss = bench(fw, &pkt([198, 19, 9, 7]));
        let ho: &Xdp = ebpf.program("exp_hash_only").unwrap().try_into().unwrap();
        let h1 = bench(ho, &pkt([198, 19, 0, 7]));
        let h2 = bench(ho, &pkt([198, 19, 9, 7]));
        println!("hash-only hit {:.2}x miss {:.2}x", h1 / floor, h2 / floor);
        println!(
            "round {round}: floor {floor:.1}ns hit {hit:.1} ({:.2}x) miss {miss:.1} ({:.2}x)",
            hit / floor,
            miss / floor
        );
    }
    if std::env::var("HOLD").is_ok() {
        println!("id {}", fw.info().unwrap().id());
        std::thread::sleep(std::time::Duration::from_secs(8));
    }
}

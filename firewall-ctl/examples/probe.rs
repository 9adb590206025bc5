fn main() {
    let mut ebpf = aya::EbpfLoader::new().load(firewall_ctl::EBPF_OBJ).unwrap();
    for (n, m) in ebpf.maps() { println!("map {n} {:?}", std::mem::discriminant(m)); }
    let p: &mut aya::programs::Xdp = ebpf.program_mut("firewall").unwrap().try_into().unwrap();
    match p.load() { Ok(()) => println!("loaded"), Err(aya::programs::ProgramError::LoadError{io_error, verifier_log}) => { println!("{io_error}\n{verifier_log}"); } Err(e) => println!("{e}") }
    let info = p.info().unwrap();
    println!("maps {:?} xlated {:?}", info.map_ids(), info.size_translated());
}

//! firewall-ctl: the command line lives in `firewall_ctl::cli`.

fn main() -> std::process::ExitCode {
    firewall_ctl::cli::main()
}

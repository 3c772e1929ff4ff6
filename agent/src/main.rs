//! squib-agent: PID 1 of every squib microVM. Mounts the guest's file systems, listens on vsock
//! and runs the container's processes.

fn main() -> std::process::ExitCode {
    eprintln!("squib-agent: the agent is not built yet");
    std::process::ExitCode::FAILURE
}

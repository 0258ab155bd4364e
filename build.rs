//! One compile-time fact the code cannot get from `cfg` on stable Rust: whether the target turns
//! NEON on for the whole binary (thumbv7neon, the 32-bit Raspberry Pi build). Stable rustc does
//! not report 32-bit Arm's `neon` in `cfg(target_feature)`, so the target's name says it.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(neon_throughout)");
    println!("cargo::rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("thumbv7neon-") {
        println!("cargo::rustc-cfg=neon_throughout");
    }
}

// Keeps libtorch_cuda among the binary's NEEDED entries: nothing calls into it directly, so
// `--as-needed` would drop it and libtorch would not register its CUDA kernels at run time
// (`tch::Cuda::is_available()` false on a GPU). See shared/GPU.md.
fn main() {
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

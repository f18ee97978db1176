// Compiles csrc/cuda_shim.cpp (CUDA graphs, device properties) and csrc/dist_shim.cpp (c10d
// process groups) against the libtorch that torch-sys found (DEP_TCH_LIBTORCH_LIB), the CUDA and
// NCCL headers of PyPI's nvidia wheels beside it (or /usr/local/cuda), and gloo's headers
// (.cache/gloo, unpacked by scripts/setup-libtorch.sh).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/cuda_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports the libtorch lib dir"),
    );
    let root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let include = root.join("include");
    let site = root
        .parent()
        .expect("torch sits in site-packages")
        .to_path_buf();
    let cuda_include = [site.join("nvidia/cu13/include"), site.join("nvidia/cuda_runtime/include"), PathBuf::from("/usr/local/cuda/include")]
        .into_iter()
        .find(|p| p.join("cuda_runtime_api.h").exists())
        .expect("CUDA headers (cuda_runtime_api.h) not found: install torch==2.11.0 from PyPI (scripts/setup-libtorch.sh) or the CUDA toolkit");
    let cuda_lib = cuda_include
        .parent()
        .expect("include dir has a parent")
        .join("lib");
    let nccl_include = [site.join("nvidia/nccl/include"), PathBuf::from("/usr/include")]
        .into_iter()
        .find(|p| p.join("nccl.h").exists())
        .expect("NCCL headers (nccl.h) not found: install torch==2.11.0 from PyPI (scripts/setup-libtorch.sh), which brings nvidia-nccl");
    let gloo_include =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/gloo/usr/include");
    assert!(
        gloo_include.join("gloo/algorithm.h").exists(),
        "gloo headers not found in {}: run scripts/setup-libtorch.sh",
        gloo_include.display()
    );
    cc::Build::new()
        .cpp(true)
        .file("csrc/cuda_shim.cpp")
        .file("csrc/dist_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&cuda_include)
        .include(&nccl_include)
        .include(&gloo_include)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("hawada_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-search=native={}", cuda_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    if cuda_lib.join("libcudart.so.13").exists() {
        println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    } else {
        println!("cargo:rustc-link-lib=dylib=cudart");
    }
}

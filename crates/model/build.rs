//! Records where libtorch is and keeps libtorch_cuda linked into this crate's tests
//! (see prefloop-torch-link).

fn main() {
    prefloop_torch_link::link_libtorch();
}

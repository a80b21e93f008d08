//! Records where libtorch is and keeps libtorch_cuda linked into the prefloop binary and its tests
//! (see prefloop-torch-link).

fn main() {
    prefloop_torch_link::link_libtorch();
}

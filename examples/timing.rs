use resnet_wgpu::arch::{NetConfig, UnitKind};
use resnet_wgpu::net::ResNet;
use resnet_wgpu::ops::pool_fc_loss::upload_labels;
use resnet_wgpu::{Gpu, Tensor};
fn main() {
    let g = Gpu::new().unwrap();
    let cfg = NetConfig::cifar(20, UnitKind::PreAct, false, 10).unwrap();
    let mut net = ResNet::new(&g, &cfg, 1).unwrap();
    let n = 8;
    let images = Tensor::new(&g, &[n, 3, 32, 32], &vec![0.5; n * 3 * 1024]).unwrap();
    let labels = upload_labels(&g, &vec![1; n], 10).unwrap();
    for i in 0..3 {
        let t = std::time::Instant::now();
        net.forward_backward(&g, &images, &labels, false).unwrap();
        println!("iter {i}: {:?}", t.elapsed());
    }
}

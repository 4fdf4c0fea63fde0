"""DS-CNN of MLPerf Tiny's keyword-spotting benchmark (49x10 MFCC features, 12 classes).

As the reference: a (10, 4) convolution with stride 2 to 64 channels, four depthwise-separable
blocks, (25, 5) average pooling and a dense classifier. The reference uses TensorFlow's "same"
padding; padding (5, 1) here gives the same 25x5 feature map and the same MAC count. Speech
Commands cannot be downloaded here, so the default data is `synthetic-kws`.
"""

from torch import nn

INPUT_SHAPE = (1, 49, 10)
DATASET = "synthetic-kws"
PRETRAINED = False


def build_model(num_classes: int = 12) -> nn.Module:
    width = 64
    layers: list[nn.Module] = [
        nn.Conv2d(1, width, (10, 4), stride=2, padding=(5, 1), bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Dropout(0.2),
    ]
    for _ in range(4):
        layers += [
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
    layers += [nn.Dropout(0.4), nn.AvgPool2d((25, 5)), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)

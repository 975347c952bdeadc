"""The one commented defaults file: every key a YAML or a ``KEY VALUE`` override may set.

Key names follow locuslab/mdeq (v1) and locuslab/deq MDEQ-Vision (v2) so that their YAMLs and command
lines keep working. v1 YAMLs kept the solver thresholds under ``MODEL.F_THRES``/``MODEL.B_THRES``; the
loader maps those to ``DEQ.*`` (see ``deqlab.config.load_config``). Keys marked "ours" are additions.
"""
from yacs.config import CfgNode as CN

_C = CN()
_C.VERSION = 2                 # layout version: 1 = locuslab/mdeq (thresholds under MODEL), 2 = this layout
_C.OUTPUT_DIR = "output"       # checkpoints and the resolved config go to OUTPUT_DIR/<dataset>/<cfg name>/
_C.LOG_DIR = "log"             # tensorboard events go to LOG_DIR/<dataset>/<cfg name>/
_C.DATA_DIR = ""               # prefix joined in front of a relative DATASET.ROOT
_C.GPUS = (0,)                 # single-process runs use the first entry; torchrun uses LOCAL_RANK instead
_C.WORKERS = 4                 # DataLoader worker processes per rank
_C.PERCENT = 1.0               # fraction of the training set to use (a fixed random subset, seeded)
_C.PRINT_FREQ = 20             # iterations between log lines / tensorboard scalars
_C.SEED = 0                    # ours: global seed (each rank adds its rank where randomness must differ)
_C.DEVICE = "auto"             # ours: "auto" (cuda if available), "cpu" or "cuda"

_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True
_C.CUDNN.DETERMINISTIC = False
_C.CUDNN.ENABLED = True

_C.AMP = CN()                  # ours: mixed precision on CUDA; the fixed-point solver always runs in fp32
_C.AMP.ENABLED = False
_C.AMP.DTYPE = "bfloat16"      # "bfloat16" (no scaler) or "float16" (with GradScaler)

_C.MODEL = CN()
_C.MODEL.NAME = "mdeq"         # registry name: "mdeq" (classifier)
_C.MODEL.PRETRAINED = ""       # partial transfer: load matching tensors, drop the classifier
_C.MODEL.NUM_LAYERS = 5        # unrolled depth used during pretraining (f applied NUM_LAYERS times)
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.IN_CHANNELS = 3      # ours: image channels (1 for Fashion-MNIST)
_C.MODEL.NUM_GROUPS = 4        # GroupNorm groups inside residual blocks and fusion
_C.MODEL.DROPOUT = 0.0         # variational dropout rate inside the residual blocks
_C.MODEL.WNORM = True          # weight-normalise the block convs and post-fusion convs
_C.MODEL.DOWNSAMPLE_TIMES = 2  # stride-2 stem convs before the equilibrium stage
_C.MODEL.EXPANSION_FACTOR = 5  # hidden width of a residual block = EXPANSION_FACTOR * channels
_C.MODEL.BLOCK_GN_AFFINE = True
_C.MODEL.FUSE_GN_AFFINE = True
_C.MODEL.POST_GN_AFFINE = True
_C.MODEL.IMAGE_SIZE = [224, 224]  # width, height of the network input
_C.MODEL.EXTRA = CN()
_C.MODEL.EXTRA.FINAL_CONV_KERNEL = 1  # segmentation: kernel of the last conv of the seg head (1 or 3)
_C.MODEL.EXTRA.FULL_STAGE = CN()
_C.MODEL.EXTRA.FULL_STAGE.NUM_MODULES = 1
_C.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES = 4       # number of resolutions
_C.MODEL.EXTRA.FULL_STAGE.BLOCK = "BASIC"
_C.MODEL.EXTRA.FULL_STAGE.BIG_KERNELS = [0, 0, 0, 0]  # v2 key; 0 = 3x3 convs (only value supported)
_C.MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS = [1, 1, 1, 1]
_C.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS = [32, 64, 128, 256]
_C.MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS = [32, 64, 128, 256]  # classification head widths per branch
_C.MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE = 2048               # width before the linear classifier
_C.MODEL.EXTRA.FULL_STAGE.FUSE_METHOD = "SUM"

_C.DEQ = CN()
_C.DEQ.F_SOLVER = "broyden"    # forward solver: broyden | anderson | fixed_point (deqlab.solvers registry)
_C.DEQ.B_SOLVER = "broyden"    # backward (adjoint) solver, used when DEQ.GRAD == "ift"
_C.DEQ.STOP_MODE = "rel"       # "abs" or "rel" residual per sample
_C.DEQ.F_THRES = 30            # max forward solver steps
_C.DEQ.B_THRES = 40            # max backward solver steps
_C.DEQ.F_EPS = 1e-3            # forward tolerance (in STOP_MODE)
_C.DEQ.B_EPS = 1e-6            # backward tolerance (in STOP_MODE)
_C.DEQ.RAND_F_THRES_DELTA = 2  # training draws F_THRES + randint(-delta, delta) steps each iteration
_C.DEQ.SPECTRAL_RADIUS_MODE = False  # estimate the Jacobian's spectral radius at z* in eval (diagnostic)
_C.DEQ.GRAD = "ift"            # ours: "ift" (implicit), "phantom" or "unrolled"
_C.DEQ.PHANTOM_STEPS = 5       # ours: k of the phantom gradient
_C.DEQ.PHANTOM_TAU = 0.5       # ours: damping tau of the phantom gradient

_C.LOSS = CN()
_C.LOSS.JAC_LOSS_FREQ = 0.0    # probability of adding the Jacobian regulariser on an iteration
_C.LOSS.JAC_LOSS_WEIGHT = 0.0  # its weight once the DEQ phase starts
_C.LOSS.JAC_INCREMENTAL = 100000000  # add 0.1 to the weight every this many steps
_C.LOSS.JAC_STOP_EPOCH = 100000000   # no Jacobian loss from this epoch on
_C.LOSS.PRETRAIN_JAC_LOSS_WEIGHT = 0.0  # its weight during unrolled pretraining
# Segmentation loss (HRNet-Semantic-Segmentation / locuslab/mdeq names and defaults)
_C.LOSS.USE_OHEM = False       # online hard example mining on the per-pixel cross entropy
_C.LOSS.OHEMTHRES = 0.9        # OHEM: pixels whose true-class probability is below this count as hard
_C.LOSS.OHEMKEEP = 100000      # OHEM: keep at least this many pixels per batch

_C.DATASET = CN()
_C.DATASET.DATASET = "cifar10"  # cifar10 | fashion_mnist | imagenet
_C.DATASET.ROOT = "data/cifar10/"
_C.DATASET.TRAIN_SET = "train"
_C.DATASET.TEST_SET = "val"
_C.DATASET.DATA_FORMAT = "jpg"  # imagenet: image files under ROOT/TRAIN_SET/<class>/
_C.DATASET.AUGMENT = True       # standard augmentation (random crop + flip for CIFAR/ImageNet)
_C.DATASET.NUM_CLASSES = 19     # segmentation: number of classes (19 Cityscapes trainIds)
_C.DATASET.LABEL_MAPPING = "cityscapes"  # ours: "cityscapes" (label ids -> trainIds) or "none" (ids as is)

_C.TRAIN = CN()
_C.TRAIN.OPTIMIZER = "adam"     # adam | sgd
_C.TRAIN.LR = 0.001
_C.TRAIN.LR_SCHEDULER = "cosine"  # cosine | step | poly, stepped every iteration
_C.TRAIN.LR_FACTOR = 0.1        # step schedule: multiply by this at each epoch in LR_STEP
_C.TRAIN.LR_STEP = [30, 60, 90]
_C.TRAIN.WD = 0.0
_C.TRAIN.MOMENTUM = 0.9
_C.TRAIN.NESTEROV = False
_C.TRAIN.CLIP = -1.0            # gradient-norm clip, <= 0 for none
_C.TRAIN.PRETRAIN_STEPS = 0     # iterations of unrolled pretraining before the DEQ phase
_C.TRAIN.ALL_UNROLLED = False   # ours: train unrolled for the whole run (the fixed-depth baseline)
_C.TRAIN.BEGIN_EPOCH = 0
_C.TRAIN.END_EPOCH = 100
_C.TRAIN.RESUME = False         # resume from OUTPUT_DIR/.../checkpoint.pth if it exists
_C.TRAIN.MODEL_FILE = ""        # full weights to start training from (all tensors must match)
_C.TRAIN.BATCH_SIZE_PER_GPU = 32
_C.TRAIN.SHUFFLE = True
# Segmentation training (HRNet-Semantic-Segmentation / locuslab/mdeq names and defaults)
_C.TRAIN.IMAGE_SIZE = [1024, 512]  # random crop [width, height]
_C.TRAIN.BASE_SIZE = 2048       # long side of an image at scale 1.0
_C.TRAIN.FLIP = True            # random horizontal flip
_C.TRAIN.MULTI_SCALE = True     # random rescale before cropping
_C.TRAIN.DOWNSAMPLERATE = 1     # labels are downsampled by this factor
_C.TRAIN.IGNORE_LABEL = 255     # label value excluded from loss and metrics
_C.TRAIN.SCALE_FACTOR = 16      # multi-scale: scales drawn from 0.5 + randint(0, SCALE_FACTOR) / 10

_C.TEST = CN()
_C.TEST.BATCH_SIZE_PER_GPU = 32
_C.TEST.MODEL_FILE = ""         # full weights to evaluate
# Segmentation evaluation
_C.TEST.IMAGE_SIZE = [2048, 1024]  # sliding-window [width, height]
_C.TEST.BASE_SIZE = 2048        # long side of an image at scale 1.0
_C.TEST.FLIP_TEST = False       # average with the horizontally flipped prediction
_C.TEST.MULTI_SCALE = False     # average over several scales

DEFAULTS = _C

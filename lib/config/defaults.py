"""The one commented defaults file: every key a YAML or a ``KEY VALUE`` override may set.

Key names follow locuslab/mdeq (v1) and locuslab/deq MDEQ-Vision (v2) so that their YAMLs and command
lines keep working. v1 YAMLs kept the solver thresholds under ``MODEL.F_THRES``/``MODEL.B_THRES``; the
loader maps those to ``DEQ.*`` (see ``deqlab.config.load_config``). Keys marked "ours" are additions; keys
marked "unused" are accepted so the original YAMLs load, but nothing reads them.

After each section, ``allow`` declares what its keys accept (``deqlab.config.rules``); ``load_config`` checks
every value against these rules once the YAML and the overrides are merged. A key without a rule (the
booleans) accepts any value of its default's type.
"""
from typing import Any

from yacs.config import CfgNode as CN

from deqlab.config.rules import ANY, Rule, choice, empty_or, given, integer, list_of, number, registered, unused

RULES: dict[str, Rule] = {}  # dotted key -> what it accepts, in declaration order


def allow(section: str, **rules: Any) -> None:
    """Declare the rules of ``section``'s keys (``section`` "" for the top level)."""
    RULES.update({f"{section}.{key}" if section else key: rule for key, rule in rules.items()})


_SIZE = list_of(integer(lo=1), length=2)  # [width, height]

_C = CN()
_C.VERSION = 2                 # unused: layout version (1 = locuslab/mdeq, thresholds under MODEL; 2 = this
                               # layout). The loader recognises v1 keys by name (LEGACY_RENAMES), whatever it says
_C.OUTPUT_DIR = "output"       # checkpoints and the resolved config go to OUTPUT_DIR/<dataset>/<cfg name>/
_C.LOG_DIR = "log"             # tensorboard events go to LOG_DIR/<dataset>/<cfg name>/
_C.DATA_DIR = ""               # prefix joined in front of a relative DATASET.ROOT
_C.GPUS = (0,)                 # unused: the device comes from DEVICE (and LOCAL_RANK under torchrun)
_C.WORKERS = 4                 # DataLoader worker processes per rank
_C.PERCENT = 1.0               # fraction of the training set to use (a fixed random subset, seeded)
_C.PRINT_FREQ = 20             # iterations between log lines / tensorboard scalars
_C.SEED = 0                    # ours: global seed (each rank adds its rank where randomness must differ)
_C.DEVICE = "auto"             # ours: "auto" (cuda if available), "cpu" or "cuda"
_C.CPU_ALLOCATOR = "retain"    # ours: "retain" keeps freed tensor memory (up to 32 MiB a block) in glibc's heap
                               # for reuse instead of unmapping it and page-faulting it back on the next op
                               # (eager MDEQ cells ~30% faster on the CPU); "system" leaves malloc as it is
allow("", VERSION=unused(choice(1, 2)), OUTPUT_DIR=ANY, LOG_DIR=ANY, DATA_DIR=ANY, GPUS=unused(list_of(integer(lo=0))),
      WORKERS=integer(lo=0), PERCENT=number(0, 1, lo_open=True), PRINT_FREQ=integer(lo=1), SEED=integer(lo=0),
      DEVICE=choice("auto", "cpu", "cuda"), CPU_ALLOCATOR=choice("retain", "system"))

_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True
_C.CUDNN.DETERMINISTIC = False
_C.CUDNN.ENABLED = True

_C.AMP = CN()                  # ours: mixed precision (CUDA or CPU); the fixed-point solver always runs in fp32
_C.AMP.ENABLED = False
_C.AMP.DTYPE = "bfloat16"      # "bfloat16" (no scaler) or "float16" (with GradScaler; slow on CPUs without
                               # AVX512-FP16/AMX-FP16)
allow("AMP", DTYPE=choice("bfloat16", "float16"))

_C.MODEL = CN()
_C.MODEL.NAME = "mdeq"         # registry name: "mdeq" (classifier, segmenter), "deq_transformer" (language model)
_C.MODEL.PRETRAINED = ""       # partial transfer: load matching tensors, drop the classifier
_C.MODEL.NUM_LAYERS = 5        # unrolled depth used during pretraining (f applied NUM_LAYERS times)
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.IN_CHANNELS = 3      # ours: image channels (1 for Fashion-MNIST)
_C.MODEL.NUM_GROUPS = 4        # GroupNorm groups inside residual blocks and fusion
_C.MODEL.DROPOUT = 0.0         # variational dropout rate inside the residual blocks
_C.MODEL.WNORM = True          # weight-normalise the block convs and post-fusion convs (MDEQ: when NORM_TYPE is auto)
_C.MODEL.NORM_TYPE = "auto"    # ours, MDEQ cell (torchdeq's --norm_type): "weight_norm", "spectral_norm" (torchdeq's:
                               # weight = W g / sigma(W), one power iteration per training forward) or "none";
                               # "auto" = weight_norm if MODEL.WNORM else none. Another value with WNORM False is an
                               # error. The DEQ-Transformer reads MODEL.WNORM only
_C.MODEL.NORM_LAYERS = ["blocks", "post_fuse"]  # ours, MDEQ cell: the conv groups NORM_TYPE covers: "blocks" (residual
                               # blocks), "fuse" (fusion convs), "post_fuse" (1x1 convs after fusion). locuslab/mdeq:
                               # blocks + post_fuse; torchdeq zoo CIFAR: all three; zoo ImageNet: blocks only
_C.MODEL.NORM_NO_SCALE = False # ours, torchdeq's --norm_no_scale: no learned scale g (no weight_g), the factor is
                               # NORM_TARGET_NORM / norm
_C.MODEL.NORM_TARGET_NORM = 1.0  # ours, torchdeq's --norm_target_norm: g's initial value (spectral) or fixed target
_C.MODEL.NORM_CLIP = False     # ours, torchdeq's --norm_clip: clip the factor g / norm at NORM_CLIP_VALUE
_C.MODEL.NORM_CLIP_VALUE = 1.0 # ours, torchdeq's --norm_clip_value
_C.MODEL.SN_N_POWER_ITERS = 1  # ours, torchdeq's --sn_n_power_iters: power iterations per training forward (spectral)
_C.MODEL.WEIGHTS_FORMAT = "auto"  # ours: layout of TEST.MODEL_FILE / TRAIN.MODEL_FILE / MODEL.PRETRAINED: "deqlab"
                               # (ours and locuslab/mdeq's), "zoo" (torchdeq deq-zoo/mdeq: deqlab.compat.zoo_checkpoints
                               # converts it) or "auto" (zoo when the keys say so: full_stage.*)
_C.MODEL.DOWNSAMPLE_TIMES = 2  # stride-2 stem convs before the equilibrium stage
_C.MODEL.EXPANSION_FACTOR = 5  # hidden width of a residual block = EXPANSION_FACTOR * channels
_C.MODEL.BLOCK_GN_AFFINE = True
_C.MODEL.FUSE_GN_AFFINE = True
_C.MODEL.POST_GN_AFFINE = True
_C.MODEL.IMAGE_SIZE = [224, 224]  # width, height of the network input
_C.MODEL.CHANNELS_LAST = "auto"  # ours, MDEQ: True keeps weights and activations channels-last (NHWC; the
                               # solver's flat state follows that memory order), False NCHW; "auto" = NHWC where
                               # DEVICE resolves to the CPU (oneDNN's convs are faster there), NCHW on CUDA. Same
                               # results to float32 round-off (benchmarks/README.md)
_C.MODEL.COMPILE = False       # ours: torch.compile the DEQ cell for the forward solver's no-grad iterations (the
                               # application with a graph and its VJPs stay eager); each new input shape compiles
                               # once, seconds on a CPU (benchmarks/README.md)
_C.MODEL.SKIP = "none"         # ours, MDEQ: initial state of the solve (Skip DEQ, Pal et al. 2022): "none" (zeros),
                               # "skip" (a per-branch conv predictor from the injection, trained only by the skip
                               # loss) or "skipreg" (Skip DEQ V2: one cell application from zeros, f(0; x), no
                               # extra parameters); both add LOSS.SKIP_WEIGHT * mean((z0 - z*)^2) to the loss
_C.MODEL.SKIP_CHANNELS = 0     # ours, MODEL.SKIP skip: hidden width of the predictor; 0 = NUM_CHANNELS[0]
_C.MODEL.EXTRA = CN()
_C.MODEL.EXTRA.FINAL_CONV_KERNEL = 1  # segmentation: kernel of the last conv of the seg head (1 or 3)
_C.MODEL.EXTRA.FULL_STAGE = CN()
_C.MODEL.EXTRA.FULL_STAGE.NUM_MODULES = 1   # unused (one equilibrium module, as in every original config)
_C.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES = 4       # number of resolutions
_C.MODEL.EXTRA.FULL_STAGE.BLOCK = "BASIC"   # unused (BASIC is the only block)
_C.MODEL.EXTRA.FULL_STAGE.BIG_KERNELS = [0, 0, 0, 0]  # unused v2 key; 0 = 3x3 convs (only value supported)
_C.MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS = [1, 1, 1, 1]
_C.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS = [32, 64, 128, 256]
_C.MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS = [32, 64, 128, 256]  # classification head widths per branch
_C.MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE = 2048               # width before the linear classifier
_C.MODEL.EXTRA.FULL_STAGE.FUSE_METHOD = "SUM"  # unused (fusion always sums)
_BRANCHES = "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES"  # the models build one branch per NUM_CHANNELS entry
allow("MODEL", NAME=ANY,  # deqlab.models.build_model checks it against the task's registry
      PRETRAINED=ANY, NUM_LAYERS=integer(lo=1), NUM_CLASSES=integer(lo=1), IN_CHANNELS=integer(lo=1),
      NUM_GROUPS=integer(lo=2, multiple_of=2),  # the post-fusion GroupNorms use NUM_GROUPS // 2 groups
      DROPOUT=number(0, 1, hi_open=True), DOWNSAMPLE_TIMES=integer(lo=0), EXPANSION_FACTOR=integer(lo=1),
      IMAGE_SIZE=_SIZE, SKIP=choice("none", "skip", "skipreg"), SKIP_CHANNELS=integer(lo=0),
      # WNORM False with a normalisation named would be a contradiction: NORM_TYPE alone decides then
      NORM_TYPE=given("MODEL.WNORM", choice(True), choice("auto", "weight_norm", "spectral_norm", "none"),
                      otherwise=choice("auto", "none")),
      NORM_LAYERS=list_of(choice("blocks", "fuse", "post_fuse")), NORM_TARGET_NORM=number(lo=0, lo_open=True),
      NORM_CLIP_VALUE=number(lo=0, lo_open=True), SN_N_POWER_ITERS=integer(lo=1),
      WEIGHTS_FORMAT=choice("auto", "deqlab", "zoo"), CHANNELS_LAST=choice("auto", True, False))
allow("MODEL.EXTRA", FINAL_CONV_KERNEL=choice(1, 3))
allow("MODEL.EXTRA.FULL_STAGE", NUM_MODULES=unused(choice(1)), NUM_BRANCHES=integer(lo=1),
      BLOCK=unused(choice("BASIC")), BIG_KERNELS=unused(list_of(choice(0))),
      NUM_BLOCKS=list_of(integer(lo=1), length=_BRANCHES),
      NUM_CHANNELS=list_of(integer(lo=1, multiple_of="MODEL.NUM_GROUPS"), length=_BRANCHES),  # GroupNorm widths
      HEAD_CHANNELS=list_of(integer(lo=1), min_length=_BRANCHES), FINAL_CHANSIZE=integer(lo=1),
      FUSE_METHOD=unused(choice("SUM")))

# The DEQ-Transformer language model (MODEL.NAME deq_transformer; locuslab/deq DEQ-Sequence). Its unrolled
# pretraining depth is MODEL.NUM_LAYERS (--n_layer), its hidden dropout MODEL.DROPOUT, weight norm MODEL.WNORM.
_C.MODEL.TRANSFORMER = CN()
_C.MODEL.TRANSFORMER.EVAL_N_LAYER = 24   # unrolled depth of an eval-mode forward at train_step 0 (--eval_n_layer);
                                         # validations while pretraining run at steps >= 1: NUM_LAYERS (original)
_C.MODEL.TRANSFORMER.N_HEAD = 10
_C.MODEL.TRANSFORMER.D_HEAD = 70
_C.MODEL.TRANSFORMER.D_MODEL = 700
_C.MODEL.TRANSFORMER.D_EMBED = -1        # embedding width; -1: D_MODEL
_C.MODEL.TRANSFORMER.D_INNER = 48000     # feed-forward width (48000 is what wt103_deq_transformer.sh passes)
_C.MODEL.TRANSFORMER.DROPATT = 0.0       # attention dropout
_C.MODEL.TRANSFORMER.ADAPTIVE = True     # adaptive input embedding and softmax over CUTOFFS clusters
_C.MODEL.TRANSFORMER.DIV_VAL = 4         # each tail cluster's embedding is DIV_VAL times narrower
_C.MODEL.TRANSFORMER.CUTOFFS = [20000, 40000, 200000]  # cluster boundaries (token ids, frequency order)
_C.MODEL.TRANSFORMER.TIE_WEIGHTS = True  # softmax weights = embedding weights (--not_tied turns it off)
_C.MODEL.TRANSFORMER.TIE_PROJS = True    # the tail clusters' softmax projections = their embedding projections
_C.MODEL.TRANSFORMER.PRE_LNORM = False   # layer norm before (True) or after (False) each sublayer
_C.MODEL.TRANSFORMER.LOCAL_SIZE = 0      # attend only to the last LOCAL_SIZE positions; 0: no limit
_C.MODEL.TRANSFORMER.INIT_STD = 0.01     # N(0, INIT_STD) init of embeddings and plain weights (--init_std)
_C.MODEL.TRANSFORMER.PROJ_INIT_STD = 0.01  # N(0, PROJ_INIT_STD) init of the adaptive projections (--proj_init_std)
allow("MODEL.TRANSFORMER", EVAL_N_LAYER=integer(lo=1), N_HEAD=integer(lo=1), D_HEAD=integer(lo=1),
      D_MODEL=integer(lo=1), D_EMBED=integer(lo=-1), D_INNER=integer(lo=1), DROPATT=number(0, 1, hi_open=True),
      DIV_VAL=integer(lo=1), CUTOFFS=list_of(integer(lo=1)), LOCAL_SIZE=integer(lo=0), INIT_STD=number(lo=0),
      PROJ_INIT_STD=number(lo=0))

_C.LM = CN()                   # ours: sequence logistics of language modelling (locuslab/deq flag names)
_C.LM.TGT_LEN = 150            # tokens per training segment (--tgt_len)
_C.LM.EVAL_TGT_LEN = 150       # tokens per evaluation segment (--eval_tgt_len)
_C.LM.MEM_LEN = 150            # past positions kept as memory (--mem_len); 0: none
_C.LM.EXT_LEN = 0              # extra context tokens before each segment (--ext_len)
_C.LM.MAX_EVAL_STEPS = 0       # evaluate only the first N segments (--max_eval_steps); 0: all
allow("LM", TGT_LEN=integer(lo=1), EVAL_TGT_LEN=integer(lo=1), MEM_LEN=integer(lo=0), EXT_LEN=integer(lo=0),
      MAX_EVAL_STEPS=integer(lo=0))

_C.DEQ = CN()
_C.DEQ.F_SOLVER = "broyden"    # forward solver: broyden | anderson | fixed_point (deqlab.solvers registry)
_C.DEQ.B_SOLVER = "broyden"    # backward (adjoint) solver, used when DEQ.GRAD == "ift"
_C.DEQ.STOP_MODE = "rel"       # "abs" or "rel" residual per sample
_C.DEQ.F_THRES = 30            # forward budget in the original solvers' units: Broyden takes F_THRES steps after
                               # f(z0) (F_THRES + 1 f evaluations); Anderson and fixed_point evaluate f F_THRES times
_C.DEQ.B_THRES = 40            # backward (adjoint) budget, in the same units as F_THRES
_C.DEQ.F_EPS = 1e-3            # forward tolerance (in STOP_MODE)
_C.DEQ.B_EPS = 1e-6            # backward tolerance (in STOP_MODE)
_C.DEQ.F_SOLVER_MEMORY = 0     # ours: past iterates the forward solver keeps (Broyden's rank-one pairs, Anderson's
                               # window m); 0 = the solver's default (Broyden: all, Anderson: 5, DEQ-Transformer 6)
_C.DEQ.B_SOLVER_MEMORY = 0     # ours: the same for the backward solver
_C.DEQ.RAND_F_THRES_DELTA = 2  # MDEQ: iterations that add the Jacobian loss get F_THRES + a random -delta..+1
                               # forward steps, others F_THRES (locuslab/mdeq); the DEQ-Transformer: every
                               # iteration gets F_THRES - U{0..delta} (locuslab/deq). Never below 1.
_C.DEQ.SPECTRAL_RADIUS_MODE = False  # estimate rho(df/dz) at z* at every evaluation (50 VJPs per batch): logged,
                                     # tensorboard valid/sradius, CSV column sradius (diagnostic)
_C.DEQ.GRAD = "ift"            # ours: "ift" (implicit), "phantom" or "unrolled"
_C.DEQ.PHANTOM_STEPS = 5       # ours: k of the phantom gradient
_C.DEQ.PHANTOM_TAU = 0.5       # ours: damping tau of the phantom gradient
_SOLVER = registered("deqlab.solvers", "SOLVERS")


def _memory(solver_key: str) -> Rule:
    """A history length, 0 (the solver's default) for a solver that keeps none."""
    return given(solver_key, registered("deqlab.solvers", "MEMORY_OPTIONS"), integer(lo=0), otherwise=choice(0))


allow("DEQ", F_SOLVER=_SOLVER, B_SOLVER=_SOLVER, STOP_MODE=registered("deqlab.solvers.common", "STOP_MODES"),
      F_THRES=integer(lo=1), B_THRES=integer(lo=1), F_EPS=number(lo=0), B_EPS=number(lo=0),
      F_SOLVER_MEMORY=_memory("DEQ.F_SOLVER"), B_SOLVER_MEMORY=_memory("DEQ.B_SOLVER"),
      RAND_F_THRES_DELTA=integer(lo=0), GRAD=registered("deqlab.deq", "GRAD_MODES"), PHANTOM_STEPS=integer(lo=1),
      PHANTOM_TAU=number(0, 1, lo_open=True))

_C.LOSS = CN()
_C.LOSS.JAC_LOSS_FREQ = 0.0    # probability of adding the Jacobian regulariser on an iteration
_C.LOSS.JAC_LOSS_WEIGHT = 0.0  # its weight once the DEQ phase starts
_C.LOSS.JAC_INCREMENTAL = 100000000  # add 0.1 to the weight every this many steps
_C.LOSS.JAC_STOP_EPOCH = 100000000   # no Jacobian loss from this epoch on
_C.LOSS.PRETRAIN_JAC_LOSS_WEIGHT = 0.0  # its weight during unrolled pretraining
_C.LOSS.SKIP_WEIGHT = 0.01     # ours, MODEL.SKIP: weight of the skip loss mean((z0 - z*)^2) (Pal et al.'s 0.01)
# ours: the fixed-point correction loss (Geng et al. 2021; torchdeq fp_correction), DEQ.GRAD phantom only: the
# task loss on every FPC_GAP-th phantom iterate (and the last), weighted by FPC_WEIGHTS with FPC_GAMMA
_C.LOSS.FPC = False
_C.LOSS.FPC_WEIGHTS = "exp"    # "exp": gamma^(n-k-1), "linear": 1 - (n-k-1)/n * gamma, "const": 1
_C.LOSS.FPC_GAMMA = 0.8        # torchdeq's --gamma default
_C.LOSS.FPC_GAP = 1            # keep every FPC_GAP-th of the DEQ.PHANTOM_STEPS iterates (torchdeq's --sup_gap)
# Segmentation loss (HRNet-Semantic-Segmentation / locuslab/mdeq names and defaults)
_C.LOSS.USE_OHEM = False       # online hard example mining on the per-pixel cross entropy
_C.LOSS.OHEMTHRES = 0.9        # OHEM: pixels whose true-class probability is below this count as hard
_C.LOSS.OHEMKEEP = 100000      # OHEM: keep at least this many pixels per batch
allow("LOSS", JAC_LOSS_FREQ=number(0, 1), JAC_LOSS_WEIGHT=number(lo=0), JAC_INCREMENTAL=integer(lo=1),
      JAC_STOP_EPOCH=integer(lo=0), PRETRAIN_JAC_LOSS_WEIGHT=number(lo=0), OHEMTHRES=number(0, 1, lo_open=True),
      OHEMKEEP=integer(lo=0), SKIP_WEIGHT=number(lo=0), FPC_WEIGHTS=choice("const", "linear", "exp"),
      FPC_GAMMA=number(0, 1), FPC_GAP=integer(lo=1),
      FPC=given("DEQ.GRAD", choice("phantom"), ANY, otherwise=choice(False)))  # FPC weighs the phantom iterates

_C.DATASET = CN()
_C.DATASET.DATASET = "cifar10"  # a name in deqlab.data.DATASETS: cifar10, fashion_mnist, imagenet, cityscapes, ...
_C.DATASET.ROOT = "data/cifar10/"
_C.DATASET.TRAIN_SET = "train"
_C.DATASET.TEST_SET = "val"
_C.DATASET.DATA_FORMAT = "jpg"  # imagenet: "jpg" = ROOT/<TRAIN_SET|TEST_SET>/<class>/<image>, "rec" = MXNet
                                # recordIO ROOT/<set>.rec + .idx (tools/make_recordio.py)
_C.DATASET.LOADER = "torchvision"  # ours, imagenet: "torchvision" (DataLoader workers) or "dali" (NVIDIA DALI,
                                   # pip install -e '.[dali]'); same transforms, same batches
_C.DATASET.DALI_DEVICE = "auto"    # ours, LOADER dali: decode on the "gpu" (mixed), the "cpu", or "auto" (gpu
                                   # when the run is on CUDA)
_C.DATASET.AUGMENT = True       # standard augmentation (random crop + flip for CIFAR/ImageNet)
_C.DATASET.MEAN = []            # ours, classification: per-channel mean of the input normalisation; [] = the dataset's
                                # usual one (CIFAR-10 (0.4914, 0.4822, 0.4465), ImageNet (0.485, 0.456, 0.406), ...)
_C.DATASET.STD = []             # ours: per-channel std; [] = the dataset's usual one (CIFAR-10: locuslab/mdeq's
                                # (0.2470, 0.2435, 0.2616); the torchdeq zoo uses (0.2023, 0.1994, 0.2010))
_C.DATASET.NUM_CLASSES = 19     # segmentation: number of classes (19 Cityscapes trainIds)
_C.DATASET.LABEL_MAPPING = "cityscapes"  # ours: "cityscapes" (label ids -> trainIds) or "none" (ids as is)
allow("DATASET", DATASET=registered("deqlab.data", "DATASETS", case_sensitive=False), ROOT=ANY, TRAIN_SET=ANY,
      TEST_SET=ANY, DATA_FORMAT=choice("jpg", "rec"), LOADER=choice("torchvision", "dali"),
      DALI_DEVICE=choice("auto", "cpu", "gpu"), NUM_CLASSES=integer(lo=1),
      LABEL_MAPPING=choice("cityscapes", "none"),
      MEAN=empty_or(list_of(number(), length="MODEL.IN_CHANNELS"), "the dataset's usual one"),  # one per channel
      STD=empty_or(list_of(number(lo=0, lo_open=True), length="MODEL.IN_CHANNELS"), "the dataset's usual one"))

_C.TRAIN = CN()
_C.TRAIN.OPTIMIZER = "adam"     # adam | radam | sgd
_C.TRAIN.LR = 0.001
_C.TRAIN.LR_SCHEDULER = "cosine"  # cosine | step | poly | constant | inv_sqrt | plateau, stepped every iteration
                                  # (deqlab.engine.optim.LRFactor; plateau = locuslab/deq's dev_perf)
_C.TRAIN.WARMUP_STEPS = 0       # ours/locuslab/deq: linear warm-up iterations (inv_sqrt: its own warm-up)
_C.TRAIN.LR_MIN = 0.0           # cosine: final LR (eta_min); plateau: lowest LR
_C.TRAIN.PATIENCE = 0           # plateau: validations without improvement before the LR is multiplied by LR_FACTOR
_C.TRAIN.MAX_STEP = 0           # stop after this many iterations (0: END_EPOCH decides); cosine spans MAX_STEP
_C.TRAIN.EVAL_INTERVAL = 0      # validate (and checkpoint) every this many iterations; 0: after every epoch
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
_C.TRAIN.RESUME_FILE = ""       # ours: resume from this checkpoint (model, optimizer, schedule, epoch) instead;
                                # the run's own checkpoint.pth is still where it saves
_C.TRAIN.MODEL_FILE = ""        # full weights to start training from (all tensors must match)
_C.TRAIN.NONFINITE = "stop"     # ours: a step whose loss, gradients, solver residual or weights go NaN/inf "stop"s
                                # the run (one line naming the step; the files keep the last finite state), or is
                                # "skip"ped (its update dropped, as AMP's GradScaler does; weights already
                                # non-finite still stop). stop is the default: a DEQ that diverged rarely recovers
                                # by dropping batches, and skipping would hide it (deqlab.engine.divergence)
_C.TRAIN.NONFINITE_MAX_SKIPS = 10  # ours, NONFINITE skip: stop after this many skipped steps in a row
_C.TRAIN.BATCH_SIZE_PER_GPU = 32
_C.TRAIN.SHUFFLE = True
# ours: before each evaluation, run PRECISE_BN_BATCHES training batches (no grad) to measure the BatchNorm
# statistics (deqlab.engine.precise_bn); PRECISE_BN writes them as the running statistics, else a warning
# says when the running ones disagree. 0 batches: neither. Early in training the running statistics still
# carry their initial variance 1 and eval-mode accuracy can sit at chance without this.
_C.TRAIN.PRECISE_BN = True
_C.TRAIN.PRECISE_BN_BATCHES = 20
# Segmentation training (HRNet-Semantic-Segmentation / locuslab/mdeq names and defaults)
_C.TRAIN.IMAGE_SIZE = [1024, 512]  # random crop [width, height]
_C.TRAIN.BASE_SIZE = 2048       # long side of an image at scale 1.0
_C.TRAIN.FLIP = True            # random horizontal flip
_C.TRAIN.MULTI_SCALE = True     # random rescale before cropping
_C.TRAIN.DOWNSAMPLERATE = 1     # labels are downsampled by this factor
_C.TRAIN.IGNORE_LABEL = 255     # label value excluded from loss and metrics
_C.TRAIN.SCALE_FACTOR = 16      # multi-scale: scales drawn from 0.5 + randint(0, SCALE_FACTOR) / 10
allow("TRAIN", OPTIMIZER=registered("deqlab.engine.optim", "OPTIMIZERS", case_sensitive=False),
      LR=number(lo=0, lo_open=True), LR_SCHEDULER=registered("deqlab.engine.optim", "SCHEDULES", case_sensitive=False),
      WARMUP_STEPS=integer(lo=0), LR_MIN=number(lo=0), PATIENCE=integer(lo=0), MAX_STEP=integer(lo=0),
      EVAL_INTERVAL=integer(lo=0), LR_FACTOR=number(lo=0, lo_open=True),
      LR_STEP=list_of(integer(lo=0)), WD=number(lo=0), MOMENTUM=number(0, 1, hi_open=True), CLIP=number(),
      PRETRAIN_STEPS=integer(lo=0), BEGIN_EPOCH=integer(lo=0), END_EPOCH=integer(lo="TRAIN.BEGIN_EPOCH"),
      MODEL_FILE=ANY, NONFINITE=choice("stop", "skip"), NONFINITE_MAX_SKIPS=integer(lo=1),
      RESUME_FILE=ANY, BATCH_SIZE_PER_GPU=integer(lo=1), IMAGE_SIZE=_SIZE, BASE_SIZE=integer(lo=1),
      DOWNSAMPLERATE=integer(lo=1), IGNORE_LABEL=integer(0, 255), SCALE_FACTOR=integer(lo=0),
      PRECISE_BN_BATCHES=integer(lo=0))

_C.TEST = CN()
_C.TEST.BATCH_SIZE_PER_GPU = 32
_C.TEST.MODEL_FILE = ""         # full weights to evaluate
_C.TEST.F_THRES = 0             # ours: forward budget at evaluation, in DEQ.F_THRES's units (validation during
                                # training and the test tools); 0 = DEQ.F_THRES. Trades accuracy for inference speed.
# Segmentation evaluation
_C.TEST.IMAGE_SIZE = [2048, 1024]  # sliding-window [width, height]
_C.TEST.BASE_SIZE = 2048        # long side of an image at scale 1.0
_C.TEST.FLIP_TEST = False       # average with the horizontally flipped prediction
_C.TEST.MULTI_SCALE = False     # average over several scales
allow("TEST", BATCH_SIZE_PER_GPU=integer(lo=1), MODEL_FILE=ANY, F_THRES=integer(lo=0), IMAGE_SIZE=_SIZE, BASE_SIZE=integer(lo=1))

DEFAULTS = _C

"""samfunc: Sharpness-Aware Minimization for PyTorch, as pure functions.

The public API is flat: everything is importable from ``samfunc``.

Examples:
    >>> import torch
    >>> import samfunc
    >>> opt = samfunc.sgd(0.1, momentum=0.9)
    >>> params = {"w": torch.zeros(3)}
    >>> opt_state = opt.init(params)
"""

from . import _serialization, _tree
from ._alias import adam as adam
from ._alias import adamw as adamw
from ._alias import sgd as sgd
from ._ascent import AverageGradientsState as AverageGradientsState
from ._ascent import RandomLeafSubsetState as RandomLeafSubsetState
from ._ascent import SamAscentState as SamAscentState
from ._ascent import ScaleByRadiusState as ScaleByRadiusState
from ._ascent import SubtractMomentumState as SubtractMomentumState
from ._ascent import average_gradients as average_gradients
from ._ascent import normalize as normalize
from ._ascent import random_leaf_subset as random_leaf_subset
from ._ascent import sam_ascent as sam_ascent
from ._ascent import scale_by_param_abs as scale_by_param_abs
from ._ascent import scale_by_radius as scale_by_radius
from ._ascent import subtract_momentum as subtract_momentum
from ._base import Combiner as Combiner
from ._base import EmptyState as EmptyState
from ._base import EngineOptions as EngineOptions
from ._base import GradientTransformation as GradientTransformation
from ._base import Method as Method
from ._base import MethodState as MethodState
from ._base import PartsOptions as PartsOptions
from ._base import PassOptions as PassOptions
from ._base import PerturbationOptions as PerturbationOptions
from ._base import Pieces as Pieces
from ._base import SamOptions as SamOptions
from ._base import Schedule as Schedule
from ._base import StateMismatchError as StateMismatchError
from ._base import StepPolicy as StepPolicy
from ._base import TransformInitFn as TransformInitFn
from ._base import TransformUpdateFn as TransformUpdateFn
from ._choose import ChoosingStep as ChoosingStep
from ._choose import compile_step as compile_step
from ._combine import ApplyIfFiniteState as ApplyIfFiniteState
from ._combine import MaskedState as MaskedState
from ._combine import apply_if_finite as apply_if_finite
from ._combine import chain as chain
from ._combine import masked as masked
from ._distributed import DataParallel as DataParallel
from ._distributed import all_mean as all_mean
from ._distributed import data_parallel as data_parallel
from ._finite import NonFiniteGradientError as NonFiniteGradientError
from ._loss_scale import DynamicLossScale as DynamicLossScale
from ._loss_scale import LossScaleState as LossScaleState
from ._loss_scale import dynamic_loss_scale as dynamic_loss_scale
from ._loss_scale import scale_loss as scale_loss
from ._loss_scale import unscale_grads as unscale_grads
from ._module import ModuleAux as ModuleAux
from ._module import disable_running_stats as disable_running_stats
from ._module import enable_running_stats as enable_running_stats
from ._module import frozen_running_stats as frozen_running_stats
from ._module import load_into_module as load_into_module
from ._module import mean_over_parts as mean_over_parts
from ._module import module_buffers as module_buffers
from ._module import module_loss as module_loss
from ._module import module_params as module_params
from ._module import module_state as module_state
from ._passes import FirstPass as FirstPass
from ._policy import SharpStepsState as SharpStepsState
from ._policy import every_n_steps as every_n_steps
from ._policy import from_step as from_step
from ._policy import full_step_fraction as full_step_fraction
from ._policy import sharp_steps as sharp_steps
from ._sam import SamGradOptions as SamGradOptions
from ._sam import perturbation as perturbation
from ._sam import perturbed_params as perturbed_params
from ._sam import sam_grad as sam_grad
from ._sam import sam_grad_and_value as sam_grad_and_value
from ._schedule import constant_schedule as constant_schedule
from ._schedule import cosine_decay_schedule as cosine_decay_schedule
from ._schedule import group_learning_rate as group_learning_rate
from ._schedule import join_schedules as join_schedules
from ._schedule import linear_schedule as linear_schedule
from ._schedule import multistep_schedule as multistep_schedule
from ._schedule import step_schedule as step_schedule
from ._schedule import warmup_cosine_decay_schedule as warmup_cosine_decay_schedule
from ._sharpness import HessianTrace as HessianTrace
from ._sharpness import Sharpness as Sharpness
from ._sharpness import hessian_trace as hessian_trace
from ._sharpness import hessian_vector_product as hessian_vector_product
from ._sharpness import loss_landscape_1d as loss_landscape_1d
from ._sharpness import loss_landscape_2d as loss_landscape_2d
from ._sharpness import module_sharpness_loss as module_sharpness_loss
from ._sharpness import random_direction as random_direction
from ._sharpness import top_hessian_eigenvalue as top_hessian_eigenvalue
from ._sharpness import worst_case_loss as worst_case_loss
from ._stateful import SAM as SAM
from ._step import StepMetrics as StepMetrics
from ._step import StepOptions as StepOptions
from ._step import TrainState as TrainState
from ._step import init_train_state as init_train_state
from ._step import make_module_train_step as make_module_train_step
from ._step import make_train_step as make_train_step
from ._transform import DecoupledWeightDecayState as DecoupledWeightDecayState
from ._transform import ScaleByAdamState as ScaleByAdamState
from ._transform import ScaleByLearningRateState as ScaleByLearningRateState
from ._transform import ScaleByScheduleState as ScaleByScheduleState
from ._transform import TraceState as TraceState
from ._transform import add_decayed_weights as add_decayed_weights
from ._transform import clip_by_global_norm as clip_by_global_norm
from ._transform import decoupled_weight_decay as decoupled_weight_decay
from ._transform import identity as identity
from ._transform import scale as scale
from ._transform import scale_by_adam as scale_by_adam
from ._transform import scale_by_learning_rate as scale_by_learning_rate
from ._transform import scale_by_schedule as scale_by_schedule
from ._transform import trace as trace
from ._tree import global_norm as global_norm
from ._update import apply_updates as apply_updates
from .integrations.lightning import LightningSAMMixin as LightningSAMMixin
from .integrations.lightning import in_second_pass as in_second_pass
from .methods.efficient import LookSamState as LookSamState
from .methods.efficient import MesaState as MesaState
from .methods.efficient import MomentumSamState as MomentumSamState
from .methods.efficient import ae_sam as ae_sam
from .methods.efficient import distillation_kl as distillation_kl
from .methods.efficient import looksam as looksam
from .methods.efficient import mesa as mesa
from .methods.efficient import momentum_sam as momentum_sam
from .methods.efficient import orthogonal_reuse as orthogonal_reuse
from .methods.sam import esam as esam
from .methods.sam import friendly_sam as friendly_sam
from .methods.sam import gsam as gsam
from .methods.sam import normalization_mask as normalization_mask
from .methods.sam import perturbed_gradient as perturbed_gradient
from .methods.sam import rho_from_learning_rate as rho_from_learning_rate
from .methods.sam import sam as sam
from .methods.sam import sharpness_aware as sharpness_aware
from .methods.sam import surrogate_gap_decomposition as surrogate_gap_decomposition
from .methods.sam import vasso as vasso
from .methods.sam import weighted_sharpness as weighted_sharpness
from .methods.sam import with_policy as with_policy
from .methods.sam import wsam as wsam

_serialization.register_safe_globals(
    [
        _tree.Position,  # the class's keys of unnamed parameters, in a method state's dicts
        EmptyState,
        MaskedState,
        ApplyIfFiniteState,
        ScaleByScheduleState,
        ScaleByLearningRateState,
        TraceState,
        ScaleByAdamState,
        DecoupledWeightDecayState,
        TrainState,
        StepMetrics,
        ModuleAux,
        Sharpness,
        HessianTrace,
        LossScaleState,
        MethodState,
        ScaleByRadiusState,
        SamAscentState,
        AverageGradientsState,
        SubtractMomentumState,
        RandomLeafSubsetState,
        SharpStepsState,
        LookSamState,
        MomentumSamState,
        MesaState,
    ]
)

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "Method",
    "MethodState",
    "Combiner",
    "EngineOptions",
    "PartsOptions",
    "PassOptions",
    "PerturbationOptions",
    "Pieces",
    "SamOptions",
    "SamGradOptions",
    "sam",
    "gsam",
    "friendly_sam",
    "vasso",
    "wsam",
    "esam",
    "looksam",
    "ae_sam",
    "momentum_sam",
    "MomentumSamState",
    "mesa",
    "MesaState",
    "distillation_kl",
    "StepPolicy",
    "SharpStepsState",
    "every_n_steps",
    "from_step",
    "sharp_steps",
    "with_policy",
    "full_step_fraction",
    "ChoosingStep",
    "compile_step",
    "FirstPass",
    "DataParallel",
    "data_parallel",
    "all_mean",
    "LookSamState",
    "orthogonal_reuse",
    "sharpness_aware",
    "perturbed_gradient",
    "surrogate_gap_decomposition",
    "weighted_sharpness",
    "rho_from_learning_rate",
    "normalization_mask",
    "sam_ascent",
    "normalize",
    "scale_by_param_abs",
    "scale_by_radius",
    "average_gradients",
    "subtract_momentum",
    "random_leaf_subset",
    "ScaleByRadiusState",
    "SamAscentState",
    "AverageGradientsState",
    "SubtractMomentumState",
    "RandomLeafSubsetState",
    "HessianTrace",
    "Sharpness",
    "hessian_trace",
    "hessian_vector_product",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "module_sharpness_loss",
    "random_direction",
    "top_hessian_eigenvalue",
    "worst_case_loss",
    "StepMetrics",
    "StepOptions",
    "TrainState",
    "init_train_state",
    "make_module_train_step",
    "make_train_step",
    "ModuleAux",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "in_second_pass",
    "LightningSAMMixin",
    "load_into_module",
    "mean_over_parts",
    "module_buffers",
    "module_loss",
    "module_params",
    "module_state",
    "EmptyState",
    "StateMismatchError",
    "ApplyIfFiniteState",
    "NonFiniteGradientError",
    "apply_if_finite",
    "DynamicLossScale",
    "LossScaleState",
    "dynamic_loss_scale",
    "scale_loss",
    "unscale_grads",
    "GradientTransformation",
    "MaskedState",
    "ScaleByAdamState",
    "ScaleByScheduleState",
    "ScaleByLearningRateState",
    "Schedule",
    "TraceState",
    "TransformInitFn",
    "TransformUpdateFn",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "decoupled_weight_decay",
    "DecoupledWeightDecayState",
    "global_norm",
    "identity",
    "join_schedules",
    "linear_schedule",
    "group_learning_rate",
    "masked",
    "multistep_schedule",
    "perturbation",
    "perturbed_params",
    "sam_grad",
    "sam_grad_and_value",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "sgd",
    "step_schedule",
    "trace",
    "warmup_cosine_decay_schedule",
]

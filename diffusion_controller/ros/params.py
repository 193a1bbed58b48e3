"""The node's parameters in ROS terms: declared from the specification (`config.PARAM_GROUPS`) with their
real types, ranges and read-only flags, every set checked against it, and the configuration read back.

Like a parameter library does for ros2_controllers: the specification is data, this module turns it into
`declare_parameter` calls and a `NodeConfig`; the node only decides what a set means while configured.
"""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from diffusion_controller.ros import config as cf

_ROS_TYPES = {
    "bool": ParameterType.PARAMETER_BOOL,
    "int": ParameterType.PARAMETER_INTEGER,
    "double": ParameterType.PARAMETER_DOUBLE,
    "string": ParameterType.PARAMETER_STRING,
}
_READ = {"live": "", "configure": " Read on configure.", "startup": " Read at process start."}


def descriptor(spec: cf.ParamSpec) -> ParameterDescriptor:
    """What `ros2 param describe` shows of a spec; rclpy holds sets to its type, range and read-only flag."""
    text = spec.description
    if spec.choices:
        text += f" One of: {', '.join(spec.choices)}."
    d = ParameterDescriptor(description=text + _READ[spec.when], read_only=spec.when == "startup")
    if spec.kind in _ROS_TYPES:
        d.type = _ROS_TYPES[spec.kind]
    else:
        # rclpy cannot type an empty list (`[]` in a params file arrives untyped, a set to [] as a byte
        # array), so list parameters are dynamically typed; check_value holds them to their element type.
        d.dynamic_typing = True
    if spec.range and spec.kind == "int":
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range and spec.kind == "double":
        d.floating_point_range = [
            FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]), step=0.0)
        ]
    return d


def _declared_value(spec: cf.ParamSpec, given: Any) -> Any:
    """The value to declare for what the process was started with: as check_value makes it where it
    passes (an integer for a double parameter becomes a double), else as given (rclpy, or configure,
    says what is wrong with it). An empty list is None: declared without a value."""
    try:
        value = cf.check_value(spec, given)
    except cf.ConfigError:
        return given
    if isinstance(value, tuple):
        return list(value) or None
    return value


class NodeParameters:
    """The parameters of one node: declaration, the check of a set, and the configuration."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._log = node.get_logger()
        # Startup values rclpy refused (name -> value): declared with the default, reported by configure.
        self._refused: dict[str, Any] = {}
        self.declare(cf.NODE_PARAMS)
        self.declare_sources()

    def declare(self, specs: tuple[cf.ParamSpec, ...]) -> None:
        """Declare the specs not declared yet, with the values the process was started with.

        rclpy refuses an integer for a double parameter (`rate_hz: 100`); the value is declared as a double
        instead, as `config/template.yaml` promises. A value rclpy still refuses (a wrong type, out of
        range) must not end the process: it is logged, the default declared, and configure fails naming
        it until a valid value is set."""
        given = self.overrides()
        for spec in specs:
            if self._node.has_parameter(spec.name):
                continue
            value = given.get(spec.name, spec.default)
            try:
                self._node.declare_parameter(
                    spec.name, _declared_value(spec, value), descriptor(spec), ignore_override=True
                )
            except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
                self._node.declare_parameter(
                    spec.name, _declared_value(spec, spec.default), descriptor(spec), ignore_override=True
                )
                self._refused[spec.name] = value
                try:
                    cf.check_value(spec, value)
                    why = str(exc)
                except cf.ConfigError as bad:
                    why = str(bad)
                self._log.error(f"{why}; until it is set to a valid value, configure fails")

    def declare_sources(self) -> None:
        """Per-source parameters exist only for the names in observations.sources (ros2_control style)."""
        try:
            names = cf.check_value(cf.spec_for("observations.sources"), self.value("observations.sources"))
        except cf.ConfigError:
            return  # configure says what is wrong with the list
        for name in names:
            if name and name.replace("_", "a").isalnum():
                self.declare(cf.source_param_specs(name))

    def value(self, name: str) -> Any:
        return self._node.get_parameter(name).value

    def values(self) -> dict[str, Any]:
        """Every parameter by name, with a refused startup value in place of its default."""
        names = self._node.list_parameters([], 0).names
        return {p.name: p.value for p in self._node.get_parameters(names)} | self._refused

    def config(self) -> cf.NodeConfig:
        """The checked configuration (ConfigError naming every bad value); warns about names in the
        params file or on the command line that nothing reads."""
        cfg = cf.NodeConfig.from_params(self.values())
        for problem in cf.unknown_parameters(self.overrides(), cfg.source_names):
            self._log.warning(f"{problem}: ignored")
        return cfg

    def check(self, params: list[Parameter], configured: bool) -> str:
        """Why a set is refused ('' when it is not): a value outside its spec, or a parameter that is only
        read on configure while the node is configured."""
        for p in params:
            spec = cf.spec_for(p.name)
            if spec is None:
                continue
            try:
                cf.check_value(spec, p.value)
            except cf.ConfigError as exc:
                return str(exc)
            if configured and spec.when != "live":
                return f"{p.name} is read on configure: deactivate, cleanup, set it, configure again"
        return ""

    def coerce(self, params: list[Parameter]) -> list[Parameter]:
        """A set of an integer for a double parameter (`ros2 param set ... rate_hz 100`), as a double:
        rclpy would refuse it for its type (pre-set callback, where rclpy has them)."""
        return [
            Parameter(p.name, value=float(p.value))
            if p.type_ == Parameter.Type.INTEGER and getattr(cf.spec_for(p.name), "kind", "") == "double"
            else p
            for p in params
        ]

    def accepted(self, params: list[Parameter]) -> None:
        """A set went through: a value refused at startup is replaced."""
        for p in params:
            self._refused.pop(p.name, None)

    def overrides(self) -> dict[str, Any]:
        """The values the process was started with (params files, `-p`), by name."""
        # rclpy has no public accessor for a node's parameter overrides (rclcpp has
        # NodeParametersInterface::get_parameter_overrides); a typo in a params file is only visible here.
        return {name: p.value for name, p in getattr(self._node, "_parameter_overrides", {}).items()}

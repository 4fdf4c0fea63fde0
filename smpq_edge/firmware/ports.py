"""The board's port (``Board.port``) in the firmware: compiler flags, timer defines, the
bare-metal memory map and linker rules, and the README's run section."""

from __future__ import annotations

from smpq_edge.firmware.templates import FIRMWARE_DIR, c_identifier, comment_text, fill_template
from smpq_edge.inputs.boards import Board, Core, Port


KB = 1024


def cpu_flags(board: Board) -> list[str]:
    """GCC flags for the board's core: -mcpu (with +nofp/+nodsp), -mthumb, FPU and float ABI."""
    core = board.core.value
    if board.core == Core.cortex_m0plus or board.core == Core.cortex_m3:
        return [f"-mcpu={core}", "-mthumb", "-mfloat-abi=soft"]
    suffix = ""
    if board.core in (Core.cortex_m33, Core.cortex_m55) and not board.dsp:
        suffix += "+nodsp"
    if not board.fpu:
        return [f"-mcpu={core}{suffix}+nofp", "-mthumb", "-mfloat-abi=soft"]
    fpu = {
        Core.cortex_m4: "fpv4-sp-d16",
        Core.cortex_m7: "fpv5-sp-d16",  # single precision: runs on the -sp and the -d16 FPUs
        Core.cortex_m33: "fpv5-sp-d16",
        Core.cortex_m55: "auto",
    }[board.core]
    return [f"-mcpu={core}{suffix}", "-mthumb", f"-mfpu={fpu}", "-mfloat-abi=hard"]


def defines(board: Board, port: Port) -> list[str]:
    defines = [
        f"SMPQ_HAS_DWT={int(board.has_dwt)}",
        f"SMPQ_USE_SYSTICK={int(port.use_systick or not board.has_dwt)}",
        f"SMPQ_DWT_UNLOCK={int(port.dwt_unlock)}",
    ]
    if port.systick_handler != "SysTick_Handler":
        defines.append(f"SMPQ_SYSTICK_HANDLER={c_identifier(port.systick_handler)}")
    return defines


def memory_map(board: Board) -> dict[str, str]:
    """The linker script's memory regions: flash_kb at the port's flash origin, and the port's
    contiguous RAM (or ram_kb) at its RAM origin."""
    port = board.port
    flash_kb, ram_kb = int(board.flash_kb), int(port.ram_kb or board.ram_kb)
    return {
        "memory_comment": f"flash {flash_kb} KB at 0x{port.flash_origin:08x}, RAM {ram_kb} KB at 0x{port.ram_origin:08x}",
        "flash_origin": f"0x{port.flash_origin:08x}", "flash_length": f"{flash_kb}K",
        "ram_origin": f"0x{port.ram_origin:08x}", "ram_length": f"{ram_kb}K",
        "stack_size": f"0x{int(port.stack_kb * KB):x}",
    }


def link_rules(port: Port) -> str:
    if port.kind == "library":
        return fill_template("ports/library/link.mk.in", {})
    run_rules = ""
    if (FIRMWARE_DIR / f"ports/{port.run}/run.mk.in").exists():
        values = ({"pyocd_target": port.pyocd_target} if port.pyocd_target else
                  {"qemu_machine": port.qemu_machine} if port.qemu_machine else {})
        run_rules = "\n" + fill_template(f"ports/{port.run}/run.mk.in", values)
    return fill_template("ports/baremetal/link.mk.in", {"run_rules": run_rules})


def run_section(board: Board, port: Port, app_name: str) -> str:
    relative = f"ports/{port.run}/README.run.md.in"
    if port.run == "qemu":
        return fill_template(relative, {"app_name": app_name, "kernels": board.kernels,
                                        "qemu_machine": port.qemu_machine,
                                        "instructions_per_tick": port.instructions_per_tick})
    if port.run == "stm32":
        return fill_template(relative, {
            "app_name": app_name, "board_description": comment_text(board.description),
            "flash_origin": f"0x{port.flash_origin:08x}", "ram_origin": f"0x{port.ram_origin:08x}",
            "ram_length_kb": int(port.ram_kb or board.ram_kb), "pyocd_target": port.pyocd_target,
        })
    timer_hint = (
        "Cycles come from DWT CYCCNT." if board.has_dwt and not port.use_systick
        else f"Cycles come from SysTick: `{port.systick_handler}` (in smpq_timer.c) must be the SDK's "
             "SysTick vector, and nothing else may use SysTick."
    )
    return fill_template(relative, {
        "board": comment_text(board.name), "core": board.core.value,
        "cmsis_lib": " and CMSIS-NN" if board.kernels == "cmsis_nn" else "",
        "sdk_hint": port.sdk_hint, "timer_hint": timer_hint, "flash_hint": port.flash_hint,
    })

//! How a device raises an interrupt without knowing the interrupt controller.
//!
//! KVM backs a line with its in-kernel irqchip (IOAPIC pin on x86_64, vGIC SPI on aarch64); HVF
//! with `hv_gic_set_spi`. Devices only ask for an edge ([`InterruptLine::trigger`]) or a level.

/// A failure to signal an interrupt line; the raw OS or hypervisor code is kept.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The backend refused to change the line's level.
    #[error("setting interrupt line {gsi} to {level} failed (code {code})")]
    SetLevel {
        /// The global system interrupt number of the line.
        gsi: u32,
        /// The level that was asked for.
        level: bool,
        /// The raw error code (errno for KVM, `hv_return_t` for HVF).
        code: i64,
    },
}

/// One interrupt input of the guest's interrupt controller.
pub trait InterruptLine: Send + Sync {
    /// Signals an edge: raise the line and lower it again.
    ///
    /// # Errors
    ///
    /// [`InterruptError::SetLevel`] when the backend refuses.
    fn trigger(&self) -> Result<(), InterruptError>;

    /// Holds the line at `level` until told otherwise (level-triggered devices).
    ///
    /// # Errors
    ///
    /// [`InterruptError::SetLevel`] when the backend refuses.
    fn set_level(&self, level: bool) -> Result<(), InterruptError>;
}

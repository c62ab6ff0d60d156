fn main() {
    println!("tcpgate: under construction");
}
